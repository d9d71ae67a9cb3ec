"""Typed refusals the HTTP layer maps to status codes (400 / 429 / 500 / 503), and the one the router ends as
"length"."""


class PromptTooLong(ValueError):
    """The prompt cannot fit: longer than max_seq_len or than the whole KV pool (HTTP 400)."""


class QueueFull(RuntimeError):
    """The waiting queue is at its request or token limit (HTTP 429)."""


class NoMeshAvailable(RuntimeError):
    """No mesh came up within the router's wait (HTTP 503 with Retry-After)."""


class MeshFailures(RuntimeError):
    """`max_mesh_failures` meshes in a row failed while computing the request's prefill chunk or a decode round it
    was in, with no decode step of it done in between, the last computing it alone: it ends (HTTP 500) rather than
    move again, so that one whose prefill or decode crashes the device cannot take down each mesh it reaches."""


class RoomFilled(ValueError):
    """A continuation's tokens so far already fill what the mesh has room for (its max_tokens, cut to the mesh's
    max_seq_len after the prompt), or its prompt alone does (a redeploy's shorter meshes): its answer ends there,
    finish_reason "length", as vLLM's ends at max_model_len."""


class Unsupported(ValueError):
    """The request asks for something the mesh's backend cannot do (HTTP 400 naming `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param

    def __reduce__(self):  # crosses processes with its param
        return Unsupported, (self.param, str(self).removeprefix(f"{self.param}: "))
