"""Student training: annotation Parquet to token batches, the Ray Train loop, HF export."""
