"""Where runs are written and read back: the MLflow tracker, the portable run record (record:DIR), their one
buffered run, and the learning-curves artifact format."""
