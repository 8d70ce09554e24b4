"""The root exception and the error an HTTP handler raises to answer with a JSON error."""


class EnclaveError(Exception):
    """Root of every error this package raises on purpose."""


class ApiError(EnclaveError):
    """An answer to the client: HTTP status, snake_case code and a human sentence.

    The message is sent to the client, so it must never contain a secret value.
    """

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}
