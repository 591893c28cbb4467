"""`hybridmednet serve`: one model behind an HTTP API and a web page (FastAPI + uvicorn).

`app` wires the endpoints; `uploads` checks and decodes what a client sends; `inference` holds the
loaded model and scores batches; `batching` runs the model on one worker thread and groups requests
that arrive together; `schemas` documents every response field. FastAPI and uvicorn come with the
`serve` extra and are imported only here, so the rest of the package does not need them.
"""

from __future__ import annotations

from hybridmednet.errors import HybridMedNetError


class ServeError(HybridMedNetError):
    """A model or setting the server cannot serve with; the message says what to change."""
