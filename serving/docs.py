"""The service's docs page at / (also /docs) and its OpenAPI spec at /docs.json: BentoML's spec of the typed APIs
with tailwise's title, version, description and error answers, shown by the Swagger UI files BentoML ships (no
third-party scripts)."""

from __future__ import annotations

import functools
import html
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.routing import Route

from tailwise import __version__
from tailwise.serving.artifact import model_summary

DESCRIPTION = """Long-tailed image classification with an exported tailwise model ({model}: {summary}), run by
onnxruntime.

* `POST /classify`: one image (multipart file field `image`, or the image itself as the body with its
  `Content-Type: image/png`, `image/jpeg`, ... and `?top_k=` in the query) and `top_k` (1 to {classes}) -> the
  top-k labels, probabilities (0..1) and each label's training-frequency group (many / medium / few), and the
  conformal prediction set: `set`, the labels the model cannot rule out (it holds the true class at the served
  coverage, per class), and `unsure`, true when the set is not exactly one label (both null without sets).
* `POST /classify_batch`: several images (file fields `images`) -> one record per file, in order.
* `POST /model_info`: classes, training counts, groups, test metrics, prediction sets and the served coverage,
  versions and limits.
* `GET /readyz`, `/livez`: health; `GET /metrics`: Prometheus.

Every 4xx answer is `{{"error": "reason"}}`; an overloaded server answers 503 with `Retry-After`."""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<title>{title}</title>
<link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
<script>
window.onload = function () {{
  window.ui = SwaggerUIBundle({{url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
                               presets: [SwaggerUIBundle.presets.apis]}});
}};
</script>
</body>
</html>
"""
ERRORS = (("400", "Bad request: the reason"), ("413", "Body over TAILWISE_MAX_UPLOAD_BYTES"),
          ("415", "Body neither multipart/form-data nor (/classify) an image"),
          ("503", "Overloaded: retry after Retry-After seconds"))


def openapi_spec(service, model_path: Path, meta: dict) -> dict:
    """bentoml's OpenAPI spec of `service` with tailwise's title, version, description and error answers."""
    spec = service.openapi_spec.asdict()
    spec["info"] = {"title": f"tailwise: {model_path.parent.name}", "version": __version__,
                    "description": DESCRIPTION.format(model=model_path.parent.name, classes=meta["num_classes"],
                                                      summary=model_summary(meta))}
    spec["tags"] = [{"name": "Service APIs", "description": "Classification with the served model"},
                    {"name": "Infrastructure", "description": "Health and Prometheus metrics"}]
    error = {"application/json": {"schema": {"type": "object", "required": ["error"],
                                             "properties": {"error": {"type": "string"}}}}}
    for path in ("/classify", "/classify_batch", "/model_info"):
        responses = spec["paths"][path]["post"]["responses"]
        for status, text in ERRORS:
            if status not in ("415", "503") or path != "/model_info":   # the classify paths' own
                responses[status] = {"description": text, "content": error}
        responses.pop("422", None)
        responses.pop("500", None)
    body = spec["paths"]["/classify"]["post"].get("requestBody", {}).get("content")
    if body is not None:  # the raw image body beside multipart
        body["image/*"] = {"schema": {"type": "string", "format": "binary"}}
    return spec


def docs_app(service, model_path: Path, meta: dict) -> Starlette:
    """The docs routes, to mount before bentoml's own / and /docs.json; /docs, where FastAPI users look, redirects."""
    spec = functools.cache(lambda: openapi_spec(service, model_path, meta))
    title = html.escape(f"tailwise: {model_path.parent.name} ({__version__})")

    async def page(request):
        return HTMLResponse(PAGE.format(title=title))

    async def spec_json(request):
        return JSONResponse(spec())

    return Starlette(routes=[Route("/", page), Route("/docs.json", spec_json),
                             Route("/docs", lambda request: RedirectResponse(str(request.base_url)))])
