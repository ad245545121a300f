"""Tools no task imports: the QC picture, the demo and synthetic test plates."""
