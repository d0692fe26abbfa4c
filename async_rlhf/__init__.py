"""async-rlhf core: config, controller, queue, broker, HTTP API and CLI."""
