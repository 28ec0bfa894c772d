"""Questions asked of the archive and of detector runs: scoring (eval) and queries."""
