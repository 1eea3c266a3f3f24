"""``import modloc``: the public API, lazy, without torch; the wheel's one top-level package."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import modloc


def test_every_public_name_resolves_and_is_listed():
    for name in modloc.__all__:
        assert getattr(modloc, name) is not None, name
    assert set(modloc.__all__) <= set(dir(modloc))


def test_the_readme_example_runs_where_torch_cannot_be_imported(tiny_artifacts, tiny_dataset, tmp_path):
    # torch made unimportable (as in an install without the train/export extras): the public
    # API still loads, localizes on ONNX Runtime and writes the submission
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError

        import modloc

        assert "modloc.engine.runtime" not in sys.modules  # nothing imported before use
        videos = list(modloc.read_videos("{tiny_dataset}/test/*.tfrecord"))
        classes = sorted({{int(c) for v in modloc.read_videos("{tiny_dataset}/validate/*.tfrecord")
                          for c in v.segment_labels}})
        with modloc.Localizer.from_artifacts("{tiny_artifacts}", class_ids=classes) as localizer:
            results = localizer.localize(videos)
            best = int(results[0].candidate_ids[0])
            assert results[0].segments(best)
            localizer.rankings.write_submission("{tmp_path}/submission.csv")
        rows = modloc.read_submission("{tmp_path}/submission.csv")
        assert sum(map(len, rows.values())) > 0
        print(len(videos), "videos")
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("videos")


def test_an_unknown_attribute_is_an_attribute_error():
    try:
        modloc.Engine  # noqa: B018 (the old name: gone)
    except AttributeError as error:
        assert "'modloc' has no attribute 'Engine'" in str(error)
    else:
        raise AssertionError("modloc.Engine resolved")
