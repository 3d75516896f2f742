"""The control socket: the HTTP/1.1 server on h11, the API routes, modelctl, the Python client."""
