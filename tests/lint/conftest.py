# The fixtures are code with the mistakes the linter must find: read, never imported.
collect_ignore = ["fixtures"]
