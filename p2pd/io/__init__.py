"""The I/O layer: trio services that perform what ``p2pd.core`` decides."""
