"""Settings made with dataclasses.replace are validated when a Platform takes them (settings=): a str home was a
raw AttributeError, threads=0 a raw ValueError deep in a retrieval, db_pool_size=0 and a sample rate of 5 went
through."""
from __future__ import annotations

import dataclasses

import pytest

import mlplat as mp


@pytest.mark.parametrize(("change", "message"), [
    ({"threads": 0}, "threads must be at least 1"),
    ({"db_pool_size": 0}, "db_pool_size must be at least 1"),
    ({"served_sample_rate": 5.0}, "served_sample_rate must be at most 1"),
    ({"database_url": "mysql://x/y"}, "unsupported scheme"),
    ({"online_store": 7}, "online_store must be a str"),
])
def test_replaced_settings_are_checked(tmp_path, change, message):
    settings = dataclasses.replace(mp.Settings.resolve(tmp_path / "home", environ={}), **change)
    with pytest.raises(mp.ConfigError, match=message):
        mp.Platform(settings=settings)
    assert not (tmp_path / "home").exists()  # refused before anything was made


def test_a_replaced_home_given_as_text_is_used(tmp_path):
    base = mp.Settings.resolve(tmp_path / "a", environ={})
    with mp.Platform(settings=dataclasses.replace(base, home=str(tmp_path / "b"))) as p:
        assert p.settings.home == tmp_path / "b"
        assert p.settings.database_url == base.database_url  # as replaced: only home changed
    assert base.checked() == base
