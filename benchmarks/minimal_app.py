"""The yardstick of benchmarks/bench_service.py: the smallest honest HTTP service of the same model, with no
batching, no limits and no middleware. Starlette + python-multipart + Pillow + onnxruntime, run by uvicorn:

    TAILWISE_MODEL=models/NAME python -m uvicorn --app-dir benchmarks minimal_app:app --port 3001

POST /classify takes the image as a multipart file field `image` (or as the raw body), decodes it with the
same function as tailwise (tailwise._core.load_image) and answers the top 3 classes as JSON.
"""

import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from tailwise._core import load_image
from tailwise.serving.artifact import OnnxClassifier

model = OnnxClassifier(os.environ["TAILWISE_MODEL"])


async def classify(request):
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        data = await (await request.form())["image"].read()
    else:
        data = await request.body()
    logits = model.predict_arrays(load_image(data, model.meta)[None])
    return JSONResponse({"predictions": model.top_k(logits, 3)[0]})


app = Starlette(routes=[Route("/classify", classify, methods=["POST"])])
