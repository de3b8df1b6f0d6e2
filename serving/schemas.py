"""What the service's APIs take and answer: request parsing that turns every malformed request into a 400 with
its reason (a 415 for a body of another media type), and the typed answers (pydantic models, which BentoML's OpenAPI spec describes).

An image comes as a multipart/form-data file field named after the parameter, or, for /classify, as the raw
request body with its image type (`Content-Type: image/png`, `image/jpeg`, ..., or application/octet-stream): a
client sending one image need not build multipart. `top_k` comes as a form field or in the query string
(`/classify?top_k=5`; with either body; given both ways with two values, a 400), and an unknown query parameter
is a 400, not ignored. The API
methods get the files' bytes; they are read in memory (the body is bounded by TAILWISE_MAX_UPLOAD_BYTES), never
written to a temporary file. (BentoML 1.4's own parsing answers 500 to a multipart body without a valid boundary
and to a file under an unknown field name, downloads a URL sent as text in place of a file, and spools every
file to disk.)
"""

from __future__ import annotations

from http import HTTPStatus

from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, ClassVar

import bentoml
from bentoml.exceptions import BentoMLException, InvalidArgument
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.responses import Response

RAW_TYPES = ("image/", "application/octet-stream")
TOP_K_HELP = "classes to return, 1 to the model's number of classes (the same rule as `tailwise predict`)"


class Options(BaseModel):
    """The plain (non-file) fields of a classify request, validated by pydantic (a 400 naming the field)."""
    top_k: Annotated[int, Field(ge=1, description=TOP_K_HELP)] = 3


class Upload(bytes):
    """A file field's bytes with the client's file name (`.filename`, None when the client sent none)."""
    filename: str | None = None


class ImageRequest(bentoml.IODescriptor):
    """Base of the classify requests: file fields are `Path` in the schema (a multipart file upload in the OpenAPI
    spec), the API method gets their bytes."""

    raw_field: ClassVar[str | None] = None  # the field a raw image body fills (None: multipart only)

    @classmethod
    async def from_http_request(cls, request, serde):
        sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
        query = dict(request.query_params)   # top_k may come in the query string with either body
        if unknown := [name for name in query if name not in Options.model_fields]:
            raise InvalidArgument(f"unknown query parameter {unknown[0]!r}; this API takes top_k")
        if sent == "multipart/form-data":
            files, values = await cls.read_form(request)
            if twice := [name for name in query if name in values and values[name] != query[name]]:
                raise InvalidArgument(f"{twice[0]} given twice, {query[twice[0]]!r} in the query string and "
                                      f"{values[twice[0]]!r} in the form; give it once")
            values = {**query, **values}
        elif cls.raw_field and sent.startswith(RAW_TYPES):
            files, values = {cls.raw_field: [await request.body()]}, query
        else:
            raw = " or the image itself as the body (Content-Type: image/png, image/jpeg, ...)" if cls.raw_field else ""
            # bentoml's own client, with no file to send (classify_batch(images=[])), sends a body without a
            # Content-Type, or a urlencoded form when it has other fields
            why = " (bentoml's client sends that when it has no file to send: give at least one image)" \
                if sent in ("", "application/x-www-form-urlencoded") else ""
            raise BentoMLException(f"send multipart/form-data (fields: {cls.field_list()}){raw}, not "
                                   f"{sent or 'a body without Content-Type'}{why}",
                                   error_code=HTTPStatus.UNSUPPORTED_MEDIA_TYPE)  # 415, as BentoML's for pickle
        options = Options.model_validate(values)  # pydantic's ValidationError: a 400 naming the field
        for name in cls.multipart_fields:
            if name not in files:
                raise InvalidArgument(f"{name}: Field required (a file field)")
        # BentoML reads `.model_fields` and one attribute per field; on a model instance that access goes through
        # pydantic's deprecation warning, on every request, so it gets a plain namespace
        arguments = {**cls.arguments(files), "top_k": options.top_k}
        return SimpleNamespace(model_fields=tuple(arguments), **arguments)

    @classmethod
    async def read_form(cls, request) -> tuple[dict[str, list[bytes]], dict[str, str]]:
        try:
            form = await request.form()
        except (MultiPartException, HTTPException) as exc:
            reason = getattr(exc, "message", None) or getattr(exc, "detail", None) or exc
            raise InvalidArgument(f"malformed multipart/form-data body: {reason}") from None
        files, values = {}, {}
        for name, value in form.multi_items():
            if name not in cls.model_fields:
                raise InvalidArgument(f"unknown field {name!r}; this API takes {cls.field_list()}")
            if isinstance(value, UploadFile) != (name in cls.multipart_fields):
                kind = "a file upload" if name in cls.multipart_fields else "a plain value, not a file"
                raise InvalidArgument(f"field {name!r} must be {kind}")
            if isinstance(value, UploadFile):
                upload = Upload(await value.read())  # in memory up to 1 MiB, then spooled
                upload.filename = value.filename or None
                files.setdefault(name, []).append(upload)
                await value.close()
            else:
                values[name] = value
        return files, values

    @classmethod
    def field_list(cls) -> str:
        return ", ".join(f"{name} (file)" if name in cls.multipart_fields else name for name in cls.model_fields)

    @classmethod
    def arguments(cls, files: dict[str, list[bytes]]) -> dict:
        raise NotImplementedError


class ClassifyRequest(ImageRequest):
    image: Path = Field(description="the image file (PNG, JPEG, GIF, BMP, TIFF, WebP)")
    top_k: Annotated[int, Field(ge=1, description=TOP_K_HELP)] = 3
    raw_field: ClassVar[str | None] = "image"

    @classmethod
    def arguments(cls, files):
        if len(files["image"]) != 1:
            raise InvalidArgument(f"field 'image' takes one file, got {len(files['image'])} (use /classify_batch)")
        return {"image": files["image"][0]}


class ClassifyBatchRequest(ImageRequest):
    images: list[Path] = Field(description="the image files, one field each")
    top_k: Annotated[int, Field(ge=1, description=TOP_K_HELP)] = 3

    @classmethod
    def arguments(cls, files):
        return {"images": files["images"]}


class NoArguments(bentoml.IODescriptor):
    pass


class Answer(bentoml.IODescriptor):
    """Base of the answers: one JSON body with its Content-Length, sent in one piece (BentoML's own answer is a
    chunked stream of three ASGI messages, each passing every middleware)."""

    @classmethod
    async def to_http_response(cls, obj, serde):
        return Response(obj.model_dump_json(), media_type="application/json")


class Prediction(BaseModel):
    label: str
    index: int
    probability: float = Field(description="softmax probability, 0..1, rounded to 6 decimals")
    group: str = Field(description="the class's training-frequency group: many, medium or few")


SET_HELP = ("the labels of the conformal prediction set, most probable first: at the served coverage (model_info), "
            "it holds the true class that often, per class; null when the model has no prediction sets or they "
            "are off (TAILWISE_COVERAGE=off)")
UNSURE_HELP = ("true when the set is not exactly one label (several labels: it is one of them; none: no class is "
               "probable enough); null without sets")


class Classification(Answer):
    predictions: list[Prediction] = Field(description="the top-k classes, most probable first")
    set: list[str] | None = Field(description=SET_HELP)
    unsure: bool | None = Field(description=UNSURE_HELP)
    provider: str = Field(description="the onnxruntime execution provider that ran the model")


class FileClassification(BaseModel):
    index: int = Field(description="the file's position in the request")
    filename: str | None = Field(description="the file name the client sent with the file, else null")
    predictions: list[Prediction] = Field(description="the top-k classes, most probable first; empty on error")
    set: list[str] | None = Field(description=SET_HELP + "; null on error")
    unsure: bool | None = Field(description=UNSURE_HELP)
    error: str | None = Field(description="why this file could not be classified, else null")


class BatchClassification(Answer):
    results: list[FileClassification] = Field(description="one record per uploaded file, in order")
    provider: str = Field(description="the onnxruntime execution provider that ran the model")
