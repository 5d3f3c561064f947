"""Typed schema of the spect-node configuration.

Every section forbids unknown keys, so a typo fails at start-up with the key's
dotted name instead of being silently ignored. Paths stay as given (relative
paths are relative to the working directory, as in the seed pipeline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """Base of every section: strict keys, validated assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProjectSection(Section):
    name: str = "spect-node"
    seed: int = 42


class PathsSection(Section):
    data_root: Path | None = None
    outputs_dir: Path = Path("outputs")
    models_dir: Path = Path("models")


class DataSection(Section):
    vols_dir: Path | None = None
    masks_dir: Path | None = None
    vol_suffix: str = ""
    mask_suffix: str = "_mask"
    allow_mask_as_volume: bool = False
    recursive: bool = True
    extensions: list[str] = Field(default_factory=lambda: [".nii.gz", ".nii"])

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, value: list[str]) -> list[str]:
        if not value or any(not e.startswith(".") for e in value):
            raise ValueError("must be a non-empty list of extensions starting with '.'")
        return value


class PreprocessSection(Section):
    target_shape: tuple[int, int, int] = (64, 64, 56)
    normalize: bool = True
    normalization: Literal["percentile", "minmax"] = "percentile"
    percentile_low: float = Field(0.0, ge=0, lt=100)
    percentile_high: float = Field(99.9, gt=0, le=100)
    reorient: bool = True
    crop_spacing_mm: float | None = Field(3.0, gt=0)

    @field_validator("target_shape")
    @classmethod
    def _positive_shape(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(v < 4 for v in value):
            raise ValueError(f"must be 3 integers >= 4, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _ordered_percentiles(self) -> PreprocessSection:
        if self.percentile_low >= self.percentile_high:
            raise ValueError("percentile_low must be below percentile_high")
        return self


class ModelSection(Section):
    name: Literal["UNet3D"] = "UNet3D"
    in_channels: int = Field(1, ge=1)
    out_channels: int = Field(1, ge=1)
    init_features: int = Field(16, ge=1)
    depth: int = Field(2, ge=1, le=4)
    weights: Path = Path("models/unet3d_weights.pth")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "fp32"


class TrainSection(Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["dice_bce", "bce"] = "dice_bce"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    output_bias_prior: float | None = Field(None, gt=0, lt=1)
    val_size: float = Field(0.15, ge=0, lt=1)
    test_size: float = Field(0.15, ge=0, lt=1)
    shuffle: bool = True
    num_workers: int = Field(0, ge=0)
    augment: bool = True
    full_view_fraction: float = Field(0.3, ge=0, le=1)
    box_jitter_mm: float = Field(20.0, ge=0)
    soft_labels: bool = False
    max_minutes: float | None = Field(None, gt=0)
    checkpoint_every: int = Field(1, ge=1)
    calibrate_threshold: bool = True
    init_weights: Path | None = None

    @model_validator(mode="after")
    def _split_leaves_training(self) -> TrainSection:
        if self.val_size + self.test_size >= 1:
            raise ValueError("val_size + test_size must be below 1")
        return self


class TestSection(Section):
    __test__ = False  # not a pytest class

    batch_size: int = Field(1, ge=1)
    only_masked: bool = True
    threshold: float | None = Field(None, gt=0, lt=1)
    n_visualize: int = Field(5, ge=0)
    orientation_search: bool = True
    check_spacing: bool = True


class PostprocessSection(Section):
    enable: bool = True
    min_comp_voxels: int = Field(30, ge=0)
    keep_largest_only: bool = True
    hole_size_threshold: int = Field(0, ge=0)
    closing_structure_radius: int = Field(0, ge=0)
    median_filter_size: int = Field(0, ge=0)
    smoothing_sigma: float = Field(0.0, ge=0)
    threshold: float = Field(0.5, gt=0, lt=1)


class VizSection(Section):
    masks_out: Path = Path("outputs/masks_test")
    viz_out: Path = Path("outputs/viz_test")
    mask_suffix_out: str = "_pred_pp.nii.gz"


class TlsSection(Section):
    """DICOM TLS (PS3.15 B.1): the listening port (``enabled``) and the node's identity towards TLS peers."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _complete(self) -> TlsSection:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if self.enabled and self.certificate is None:
            raise ValueError("enabled needs certificate and private_key")
        if self.enabled and self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates (or set it to false)")
        return self


def _number_as_text(value: object) -> object:
    """An AE title written as a number in YAML or ``--set`` (``1234``) is that text."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


AETitle = Annotated[str, BeforeValidator(_number_as_text), Field(min_length=1, max_length=16)]


class NodeSection(Section):
    ae_title: AETitle = "SPECTNODE"
    host: str = Field("127.0.0.1", min_length=1)  # empty would listen on every interface
    port: int = Field(11112, ge=0, le=65535)
    max_associations: int = Field(16, ge=1)
    allowed_calling_ae_titles: list[AETitle] = Field(default_factory=list)
    series_idle_timeout: float = Field(10.0, gt=0)
    series_incomplete_timeout: float = Field(120.0, gt=0)
    accept_pet_like: bool = True
    seg_series_number: int = Field(9901, ge=1)
    seg_series_description: str = "LV myocardium SEG - RESEARCH USE ONLY"
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(30.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    maximum_pdu_size: int = Field(0, ge=0)
    job_max_attempts: int = Field(3, ge=1)
    job_retry_delay: float = Field(30.0, gt=0)
    send_max_attempts: int = Field(10, ge=1)
    send_retry_window: float = Field(3600.0, gt=0)
    send_backoff_base: float = Field(2.0, gt=0)
    send_backoff_max: float = Field(300.0, gt=0)
    min_free_bytes: int = Field(100_000_000, ge=0)
    log_format: Literal["text", "json"] = "text"
    audit_log: Path | None = None
    audit_fsync: bool = False
    unlisted_services: list[Literal["store", "query", "retrieve"]] = Field(
        default_factory=lambda: ["store", "query", "retrieve"]
    )
    tls: TlsSection = Field(default_factory=TlsSection)
    test_pause_at: Literal["convert", "infer", "encode"] | None = None


class PeerSection(Section):
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    send_results: bool = True
    services: list[Literal["store", "query", "retrieve"]] = Field(
        default_factory=lambda: ["store", "query", "retrieve"]
    )
    check_host: bool = False
    tls: bool = False

    @field_validator("ae_title", "host")
    @classmethod
    def _stripped(cls, value: str) -> str:
        """AE titles are compared without their padding spaces (PS3.5 AE): stored so, never blank."""
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()


class StorageSection(Section):
    root: Path = Path("var/spect-node")

    @field_validator("root", mode="before")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        """An empty root would silently be the current directory."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value

    retention_days: float | None = Field(None, gt=0)
    purge_every_hours: float | None = Field(24.0, gt=0)


class AppConfig(Section):
    """The whole configuration, one section per concern."""

    project: ProjectSection = Field(default_factory=ProjectSection)
    paths: PathsSection = Field(default_factory=PathsSection)
    data: DataSection = Field(default_factory=DataSection)
    preprocess: PreprocessSection = Field(default_factory=PreprocessSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    test: TestSection = Field(default_factory=TestSection)
    postprocess: PostprocessSection = Field(default_factory=PostprocessSection)
    viz: VizSection = Field(default_factory=VizSection)
    node: NodeSection = Field(default_factory=NodeSection)
    peers: list[PeerSection] = Field(default_factory=list)
    storage: StorageSection = Field(default_factory=StorageSection)

    @field_validator("peers")
    @classmethod
    def _one_entry_per_ae_title(cls, peers: list[PeerSection]) -> list[PeerSection]:
        titles = [peer.ae_title for peer in peers]
        twice = sorted({title for title in titles if titles.count(title) > 1})
        if twice:
            raise ValueError(f"AE title(s) {', '.join(twice)} listed more than once (the later entry would win)")
        return peers

    @model_validator(mode="after")
    def _grid_fits_depth(self) -> AppConfig:
        smallest, needed = min(self.preprocess.target_shape), 2 ** (self.model.depth + 1)
        if smallest < needed:  # every level halves the grid; the bottleneck needs 2 voxels per axis
            raise ValueError(
                f"preprocess.target_shape {list(self.preprocess.target_shape)} is too small for model.depth "
                f"{self.model.depth}: each axis needs at least {needed} voxels"
            )
        return self
