"""Code versions come from declared module lists: the metric table (evaluations) and
STAGE_MODULES plus the user's own filter/captioner modules (curate stages).  Editing any of
them must give a new id, so nothing stale is reused."""

from __future__ import annotations

import importlib
import linecache
import sys
import textwrap

import pytest

from imagegen import curate as C
from imagegen.evaluate import metrics as M
from imagegen.leaderboard import lower_is_better


def test_metric_table_drives_names_modules_and_direction():
    assert M.ALL_METRICS == ("fid", "kid", "clipscore", "geneval")
    names = {m.__name__ for m in M.modules(["clipscore", "geneval"])}
    # the modules the old hand-written list missed
    assert {"imagegen.evaluate.clipscore", "imagegen.clip", "imagegen.world.detector"} <= names
    assert "imagegen.evaluate.fid" not in names and "imagegen.evaluate.fid" in {m.__name__ for m in M.modules(["kid"])}
    assert [f.__name__ for f in M.compute_functions(["geneval", "kid", "fid"])] == ["fid_kid_rows", "geneval_rows"]
    assert M.needs_generated_set(["fid"]) and not M.needs_generated_set(["geneval"])
    assert lower_is_better("FID") and lower_is_better("FD-CLIP-abc") and lower_is_better("KD-CLIP-abc")
    assert not lower_is_better("CLIPScore (Hessel et al. 2021: 2.5*max(cos,0))") and not lower_is_better("GenEval overall")
    with pytest.raises(ValueError, match="unknown metric"):
        M.specs(["nope"])


def _user_module(tmp_path, name: str, body: str):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name), path
    finally:
        sys.path.remove(str(tmp_path))


def test_a_custom_filter_module_is_part_of_the_filter_stage_code(tmp_path):
    mod, path = _user_module(tmp_path, "i13_user_filter", """
        from imagegen.stages.filter import ThresholdFilter

        def make():
            return ThresholdFilter("mine", lambda img: 1.0, 0.5)
        """)
    plain = C.FilterConfig()
    custom = C.FilterConfig(custom=["i13_user_filter:make"])
    assert C.user_modules("filter", custom) == ["i13_user_filter"]
    before = C.stage_code("filter", custom)
    assert before != C.stage_code("filter", plain)
    path.write_text(path.read_text() + "\n# edited: the filter changed\n")
    linecache.checkcache(str(path))
    assert C.stage_code("filter", custom) != before
    del sys.modules[mod.__name__]


def test_a_registered_captioner_module_is_part_of_the_recaption_stage_code(tmp_path):
    from imagegen.stages.recaption import CAPTIONERS, RecaptionConfig, register_captioner

    mod, _ = _user_module(tmp_path, "i13_user_captioner", """
        def factory(cfg):
            raise NotImplementedError
        """)
    register_captioner("i13-mine", mod.factory)
    try:
        cfg = RecaptionConfig(backend="i13-mine")
        assert C.user_modules("recaption", cfg) == ["i13_user_captioner"]
        assert C.stage_code("recaption", cfg) != C.stage_code("recaption", RecaptionConfig())
    finally:
        CAPTIONERS.pop("i13-mine", None)
        del sys.modules[mod.__name__]
