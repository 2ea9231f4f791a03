"""The trainer's side of the stream: receive, validate, account, assemble and hand out batches."""
