"""The model manifest: the contract between `export/` (writes it) and `engines/` (reads it).

One JSON file beside each ONNX file (`<name>.json`). Engines trust nothing about a model that the
manifest does not say: tensor names and shapes, batch profile, labels, preprocessing and hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

#: The scale every model sees (micrometres per pixel): frames and training images are resampled to it
#: before tiling or cropping (service.analysis.scale), and each manifest records it
#: (`canonical_um_per_px`). 0.2 um/px keeps a platelet ~10 px and a normal red cell (7.5 um) ~37 px.
CANONICAL_UM_PER_PX = 0.2

#: A test-time view (service.analysis.tta): a flip of the whole frame for the detector, of each crop for a
#: classifier head; each is its own inverse.
TestTimeView = Literal["identity", "hflip", "vflip", "rot180"]


#: A finite number (JSON has no NaN or infinity, but Python's json module reads them).
Finite = Annotated[float, Field(allow_inf_nan=False)]


def _plain_name(v: str) -> str:
    if not v or v in (".", "..") or any(c in v for c in "/\\\x00"):
        raise ValueError(f"{v!r} is not a file name beside the manifest (no folders)")
    return v


#: A file beside the manifest: a plain name, never a path out of the models folder.
FileName = Annotated[str, AfterValidator(_plain_name)]


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    shape: list[int] = Field(description="-1 marks a dynamic axis (the batch axis)")
    dtype: Literal["float32", "float16", "int64", "int32", "uint8"] = "float32"

    @field_validator("shape")
    @classmethod
    def _axes(cls, v: list[int]) -> list[int]:
        if any(n < 1 and n != -1 for n in v):
            raise ValueError(f"each axis is -1 (dynamic) or at least 1, not {v}")
        return v


class BatchProfile(BaseModel):
    """TensorRT-style optimisation profile for the batch axis; ONNX Runtime batches to `max`."""

    model_config = ConfigDict(extra="forbid")
    min: int = Field(1, ge=1)
    opt: int = Field(8, ge=1)
    max: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> BatchProfile:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs min <= opt <= max, not {self.min} / {self.opt} / {self.max}")
        return self


class Preprocessing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    color: Literal["RGB", "BGR"] = "RGB"
    scale: float = Field(1.0 / 255.0, gt=0, allow_inf_nan=False,
                         description="pixel value multiplier applied to uint8 input")
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    pad_value: int = Field(114, ge=0, le=255, description="fill value used when a tile/crop is padded")
    normalization_in_graph: bool = Field(True, description="mean/std normalisation is inside the model")
    illumination: Literal["none", "flatfield"] = Field(
        "none", description="lamp correction the training images had (flatfield: each field divided by its own "
        "background, service.analysis.illumination); the pipeline feeds the same")
    stain: Literal["none", "macenko", "vahadane"] = Field(
        "none", description="stain normalisation the training images had; the pipeline feeds the same"
    )


class CropInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    extent_um: float = Field(gt=0, allow_inf_nan=False)
    input_size: int = Field(gt=0)


class OpenSet(BaseModel):
    """A classifier's open-set score and the threshold above which a crop is unlike every trained
    class (sent for review, never typed)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["mahalanobis", "energy"] = Field(
        description="mahalanobis: squared distance of the penultimate features to the nearest class mean under "
                    "one shared covariance, read from the graph output `output`; energy: the free energy of the "
                    "head's logits, -logsumexp(logits) (Liu et al. 2020), computed by the classifier from the "
                    "logits averaged over the views a crop ran in")
    output: str | None = Field(None, description="mahalanobis: name of the graph output holding the score "
                                                 "(one value per crop); energy: none")
    threshold: Finite = Field(description="scores above this are atypical")
    calibration: str = Field("", description="how the threshold was chosen")

    @model_validator(mode="after")
    def _output_matches_method(self) -> OpenSet:
        if self.method == "mahalanobis" and not self.output:
            raise ValueError("open_set method 'mahalanobis' needs the graph output that holds the distance")
        if self.method == "energy" and self.output:
            raise ValueError("open_set method 'energy' is computed from the logits: no output")
        return self


class FeatureSpace(BaseModel):
    """A classifier's penultimate features (a graph output) and the space they are compared in: the
    trained class means and one shared precision matrix, in a sidecar file (what a station's own
    class means are fitted in and compared against: service.analysis.station_means)."""

    model_config = ConfigDict(extra="forbid")
    output: str = Field(description="graph output holding the features (one row of `dim` per crop)")
    file: FileName = Field(description="sidecar .npz beside the manifest: means (classes x dim), precision (dim x dim), "
                                  "classes")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the sidecar file")
    dim: int = Field(gt=0)
    check: str = Field("", description="how the sidecar was checked against the graph")


#: Manifest fields that describe a model (figures, data, provenance) and change nothing it does.
PROVENANCE_FIELDS = frozenset({"architecture", "training_data", "split_hashes", "metrics", "created_at", "producer"})


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    schema_version: Literal[1] = 1
    name: str
    task: Literal["segmentation", "classification"]
    file: FileName = Field(description="ONNX file name, beside the manifest")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=1)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    batch: BatchProfile = BatchProfile()
    input_size: int = Field(gt=0, description="square spatial input side in pixels")
    canonical_um_per_px: float = Field(description="the scale the model was trained at: this pipeline feeds "
                                       f"{CANONICAL_UM_PER_PX} um/px only")
    preprocessing: Preprocessing = Preprocessing()
    classes: list[str] = Field(min_length=1)
    crop: CropInfo | None = None
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False,
                               description="softmax temperature from calibration (classifiers)")
    open_set: list[OpenSet] = Field(default_factory=list, description="classifiers: open-set tests for "
                                    "unidentified/atypical cells; a crop beyond any test's threshold is atypical "
                                    "(one object is read as a list of one)")
    class_log_prior_shift: dict[str, Finite] = Field(
        {}, description="classifiers: per class, a constant added to its calibrated log-odds (logits / temperature) "
        "before the softmax: a prior shift from the balanced training mix toward what stations meet, "
        "fitted on validation (how: `metrics.class_log_prior_shift`); classes not named get 0")
    score_calibration: dict[str, Annotated[list[Finite], Field(min_length=2, max_length=2)]] = Field(
        {}, description="detectors: per class [a, b] of Platt scaling, p = sigmoid(a * logit(score) + b), "
        "fitted on the validation split so that a score is the probability of a real cell")
    feature_space: FeatureSpace | None = Field(
        None, description="classifiers: the penultimate features as a graph output and their Mahalanobis space "
        "(export.feature_space); lets a station type cells by its own class means (smearscope adapt-wbc)")
    tta: list[TestTimeView] = Field(
        ["identity"], min_length=1, description="test-time views (service.analysis.tta). Detectors: views of the frame that "
        "are detected and fused; score_calibration is fitted for exactly these views. Classifiers: views of "
        "each crop whose logits are averaged; temperature is fitted for exactly these views")
    architecture: str = ""
    training_data: dict[str, Any] = {}
    split_hashes: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    created_at: str = ""
    producer: dict[str, str] = {}

    @field_validator("open_set", mode="before")
    @classmethod
    def _one_test_is_a_list_of_one(cls, v: Any) -> Any:
        if v is None:
            return []
        return [v] if isinstance(v, (dict, OpenSet)) else v

    @model_validator(mode="after")
    def _shift_names_classes(self) -> ModelManifest:
        if self.canonical_um_per_px != CANONICAL_UM_PER_PX:
            raise ValueError(f"canonical_um_per_px {self.canonical_um_per_px}: this pipeline feeds every model "
                             f"{CANONICAL_UM_PER_PX} um/px (a model trained at another scale would see cells "
                             "of the wrong size)")
        if len(set(self.classes)) != len(self.classes) or not all(self.classes):
            raise ValueError(f"classes must be distinct, non-empty names: {self.classes}")
        if self.task == "classification" and self.crop is None:
            raise ValueError("a classification model needs its crop (extent_um, input_size)")
        if self.task == "classification":
            logits = next(o for o in self.outputs if o.name == self.logits_output)
            if logits.shape[-1:] not in ([-1], [len(self.classes)]):
                raise ValueError(f"output {logits.name!r} of shape {logits.shape} does not hold one logit per class "
                                 f"({len(self.classes)})")
        if self.crop is not None and self.crop.input_size != self.input_size:
            raise ValueError(f"crop input_size {self.crop.input_size} is not the model's input_size {self.input_size}")
        for what, names in (("class_log_prior_shift", self.class_log_prior_shift),
                            ("score_calibration", self.score_calibration)):
            unknown = sorted(set(names) - set(self.classes))
            if unknown:
                raise ValueError(f"{what} names classes the model does not have: {unknown}")
        if self.feature_space is not None and self.feature_space.output not in [o.name for o in self.outputs]:
            raise ValueError(f"feature_space output {self.feature_space.output!r} is not among the outputs")
        return self

    @property
    def logits_output(self) -> str:
        """A classifier's output holding its logits: the one named so, else the first (a manifest
        may list outputs in any order)."""
        names = [o.name for o in self.outputs]
        return "logits" if "logits" in names else names[0]

    def runtime_sha256(self) -> str:
        """sha256 of what the runtime reads from this manifest (tensors, scale, preprocessing, classes,
        temperature, prior shifts, views, open-set and score calibration), not of its figures or
        provenance: a head recalibrated on the same ONNX file (same `sha256`) gets another one."""
        runtime = self.model_dump(mode="json", exclude=PROVENANCE_FIELDS)
        return hashlib.sha256(json.dumps(runtime, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def model_path(self, manifest_path: Path) -> Path:
        return manifest_path.parent / self.file


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ManifestError(ValueError):
    pass


def load_manifest(path: Path, verify_hash: bool = True) -> ModelManifest:
    """Read and validate a manifest; with `verify_hash` the model file must match its sha256."""
    try:
        manifest = ModelManifest.model_validate(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: invalid manifest: {exc}") from exc
    model = manifest.model_path(Path(path))
    if not model.exists():
        raise ManifestError(f"{path}: model file {model} is missing")
    try:
        digest = sha256_file(model) if verify_hash else manifest.sha256
    except OSError as exc:  # a folder in its place, or not readable by this user
        raise ManifestError(f"{path}: cannot read model file {model}: {exc.strerror or exc}") from exc
    if digest != manifest.sha256:
        raise ManifestError(f"{path}: sha256 of {model.name} does not match the manifest")
    return manifest
