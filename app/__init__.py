"""The domain: configuration, models, services, the LLM client and coordination. The entry points (`web/`,
`workers/`, `cli/`) parse what comes in and call one function of it; the README's module map says which module
owns each rule."""
