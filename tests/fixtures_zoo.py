"""The tiny zoo, shared by every test module that needs one.

In a test module:

    @pytest.fixture(scope="session")
    def tiny_zoo(tmp_path_factory):
        return fixtures_zoo.tiny_zoo(tmp_path_factory)

The zoo is built once per session under pytest's session temp dir; any later caller (another
module's fixture) finds it there with the same spec and only opens it.
"""

from __future__ import annotations

from mergeflow.zoo import Zoo, ZooSpec
from mergeflow.zoo.build import ensure_zoo


def tiny_zoo(tmp_path_factory) -> Zoo:
    return ensure_zoo(ZooSpec.tiny(), tmp_path_factory.getbasetemp() / "tiny_zoo", progress=False)
