"""Full-text search over session output, command lines, titles, tab names and project names."""
