"""The Ray Serve deployment behind `prorec serve` (see prorec/serve.py for the endpoint's contract).

It sits in its own module because FastAPI and Ray Serve must be imported where the class is defined
(FastAPI resolves the handlers' annotations from this module's globals), and nothing else in the
package needs them.
"""
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from prorec.serve import MAX_BODY, BadRequest, parse_request

app = FastAPI(title="PRORec", description="next-item recommendations from a trained PRORec run")


@serve.deployment(name="PRORecServer")
@serve.ingress(app)
class PRORecServer:
    """One replica: a Recommender loaded once; requests checked, then batched into one beam search."""

    def __init__(self, run_dir: str, beam: int | None = None, rerank: bool | None = None, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.005, batching: bool = True, threads: int = 1,
                 num_gpus: float = 0.0) -> None:
        import torch

        from prorec.recommend import Recommender

        torch.set_num_threads(max(1, threads))
        self.rec = Recommender(run_dir, beam, rerank, threads=threads, use_gpu=num_gpus > 0)
        self.batching = batching
        self.settings = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s,
                         "batching": batching}
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, queries: list[Any]) -> list[Any]:
        return self.rec.recommend(queries)

    @app.post("/recommend")
    async def recommend(self, request: Request) -> JSONResponse:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            return JSONResponse({"detail": f"the body has {size} bytes; at most {MAX_BODY}"}, status_code=413)
        try:
            query = parse_request(await request.body(), self.rec)
        except BadRequest as e:
            return JSONResponse({"detail": e.detail}, status_code=e.status)
        answer = await self._batched(query) if self.batching else self.rec.recommend([query])[0]
        return JSONResponse({"items": answer.items, "scores": answer.scores, "truncated": answer.truncated,
                             "popular": answer.popular})

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info(self) -> dict[str, Any]:
        return {**self.rec.info(), **self.settings}
