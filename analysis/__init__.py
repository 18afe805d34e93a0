"""Analysis package: reads the Parquet tables; never imports torch."""
