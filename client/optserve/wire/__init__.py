"""The wire format, numpy only: the one module the client and the server share."""
