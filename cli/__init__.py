"""The `agentq` command line: an entry point like `web/` and `workers/`, which parses arguments, calls
the application in `app/` and prints what the HTTP API would answer (through `web.render`)."""
