"""`make bench`: a throwaway deployment of agentq, measured against the floor of its parts.

`python -m bench.run` starts PostgreSQL, the web and worker processes and the mock upstream on
this machine, runs each measurement (see `bench.run`), prints a table and writes
`bench/results.json` and `bench/results.png`. Nothing here is imported by the application.
"""

__all__: list[str] = []
