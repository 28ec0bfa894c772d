"""Where results go: the Parquet archive, alert receivers and the console."""
