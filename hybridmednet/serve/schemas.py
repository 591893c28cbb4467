"""The answers of the API, one pydantic model each: FastAPI writes them into the OpenAPI schema, so
every field a client reads is documented at /docs and /openapi.json."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ModelInfo(BaseModel):
    name: str = Field(description='file or folder name the model was loaded from (no directories)')
    backbone: str = Field(description="the network's backbone, e.g. convnext_tiny")
    runtime: str = Field(description="'pytorch' for a checkpoint, 'onnxruntime' for an exported ONNX folder")
    weights_hash: str | None = Field(
        description='sha256 of the weights (first 16 hex digits), as `hybridmednet card` states it; '
        'null when an ONNX export does not record it'
    )
    thresholds_fitted: bool = Field(
        description='true when `hybridmednet evaluate` fitted the thresholds; false means 0.5 for every finding'
    )
    thresholds_method: str = Field(description='how the thresholds were chosen: youden, f1, sensitivity or default')


class ImageInfo(BaseModel):
    format: str = Field(description="the uploaded file's format, told from its bytes: png, jpeg or dicom")
    width: int = Field(description='columns of the image as read (before resizing to the model input)')
    height: int = Field(description='rows of the image as read')
    preview_png: str | None = Field(
        None,
        description='with ?preview=true: the image as the model read it (DICOM windowing applied), grey, '
        'at most 1024 pixels on the longer side, base64 PNG',
    )


class Finding(BaseModel):
    name: str = Field(description='the finding, as the model was trained on it')
    probability: float = Field(description='calibrated probability in [0, 1]; the threshold applies to it')
    threshold: float = Field(description='the operating point stored with the model for this finding')
    positive: bool = Field(description='probability >= threshold')
    heatmap_png: str | None = Field(
        None,
        description='with ?heatmaps=true, for positive findings: the heatmap over the image, base64 PNG '
        '(at most 512 pixels on the longer side); null otherwise',
    )


class OodResult(BaseModel):
    score: float = Field(
        description="Mahalanobis distance of the image's fused features to the training images' (higher: less alike)"
    )
    threshold: float = Field(description='scores above it are flagged (a high quantile of the validation scores)')
    flagged: bool = Field(
        description='true when the image lies further from the training images than the threshold: '
        'its findings may mean nothing'
    )


class HeatmapStatus(BaseModel):
    requested: bool = Field(description='whether ?heatmaps=true was asked')
    available: bool = Field(description='whether this model can give heatmaps (PyTorch runtime only)')


class PredictResponse(BaseModel):
    model: ModelInfo = Field(description='the model that gave this answer')
    image: ImageInfo = Field(description='the image as the server read it')
    findings: list[Finding] = Field(description="every finding, in the model's class order")
    positive_findings: list[str] = Field(description='names of the findings at or above their threshold')
    ood: OodResult | None = Field(
        description='out-of-distribution check; null when the model carries no OOD statistics (see notes)'
    )
    heatmaps: HeatmapStatus = Field(description='whether heatmaps were asked for and can be made')
    notes: list[str] = Field(
        description='what the reader should know about this answer: missing OOD statistics, unfitted thresholds, '
        'heatmaps that could not be made'
    )


class ClassInfo(BaseModel):
    name: str = Field(description='the finding')
    threshold: float = Field(description='probability at or above which the finding is reported positive')
    temperature: float | None = Field(description='temperature dividing the logit before the sigmoid; null if none')


class OodInfo(BaseModel):
    threshold: float = Field(description='OOD scores above it are flagged')
    quantile: float = Field(description='quantile of the validation scores that gave the threshold')
    n_train: int = Field(description='training images the feature distribution was fitted on')
    n_val: int = Field(description='validation images the threshold was chosen on')


class ModelResponse(BaseModel):
    model: ModelInfo = Field(description='name, backbone, runtime, weights hash, thresholds')
    classes: list[ClassInfo] = Field(description="findings in the model's output order, with their operating point")
    operating_point: dict[str, Any] = Field(
        description='how the thresholds were fitted: method, target sensitivity, the split they were fitted on, '
        'calibration (as `hybridmednet evaluate` stored it)'
    )
    preprocessing: dict[str, Any] = Field(
        description='what the server does to an image before the model sees it: image_size, mean, std, channels'
    )
    test_time_augmentation: bool = Field(description='whether logits are averaged over small zooms and shifts')
    heatmaps_available: bool = Field(description='whether ?heatmaps=true can give heatmap overlays')
    ood: OodInfo | None = Field(description='the OOD model stored with the model; null when it carries none')
    card: dict[str, Any] = Field(
        description='model card facts: architecture, classes, image size, epoch and validation AUC of the '
        'weights, intended use'
    )
    limits: dict[str, Any] = Field(description='what this server accepts: formats, upload size, pixel count, batch')
    notes: list[str] = Field(description='what a reader of any answer should know (e.g. thresholds not fitted)')


class Status(BaseModel):
    status: str = Field(description="'ok' (healthz), 'ready' or 'loading' / 'failed' (readyz)")
    detail: str | None = Field(None, description='why the model is not ready, when it is not')


class ErrorResponse(BaseModel):
    detail: str = Field(description='what was wrong with the request, in one sentence')
