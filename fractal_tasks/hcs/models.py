"""Arguments passed from the init part of a compound task to its compute part."""

from pydantic import BaseModel, ConfigDict


class InitArgsRegistration(BaseModel):
    """Passed from `init_calculate_registration` to `calculate_registration`.

    Attributes:
        reference_zarr_url: URL of the reference acquisition's image in the
            same well.
    """

    model_config = ConfigDict(extra="forbid")
    reference_zarr_url: str


class InitArgsRegistrationConsensus(BaseModel):
    """Passed from `init_find_consensus` to `find_consensus`.

    Attributes:
        zarr_url_list: URLs of every image of the well, the reference first.
    """

    model_config = ConfigDict(extra="forbid")
    zarr_url_list: list[str]
