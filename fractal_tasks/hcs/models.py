"""Arguments passed from the init part of a compound task to its compute part."""

from pydantic import BaseModel, ConfigDict, Field


class InitArgsRegistration(BaseModel):
    """Passed from `init_calculate_registration` to `calculate_registration`.

    Attributes:
        reference_zarr_url: URL of the reference acquisition's image in the
            same well.
        other_zarr_urls: Further images of the well that pair with the same
            reference, registered in the same call after `zarr_url`: the
            reference is opened and each of its ROIs read once for all of
            them, and one process serves the well. Empty (the default, as
            fractal-tasks-core's init gives) registers `zarr_url` alone.
    """

    model_config = ConfigDict(extra="forbid")
    reference_zarr_url: str
    other_zarr_urls: list[str] = Field(default_factory=list)


class InitArgsRegistrationConsensus(BaseModel):
    """Passed from `init_find_consensus` to `find_consensus`.

    Attributes:
        zarr_url_list: URLs of every image of the well, the reference first.
    """

    model_config = ConfigDict(extra="forbid")
    zarr_url_list: list[str]
