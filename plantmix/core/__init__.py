"""What every stage shares: the manifest schema and drop reasons, the stage runner, recipes, errors."""
