"""Library code logs through ``logging``; the CLI's ``setup_logging`` prints ``[fastcps] ...`` on rank 0."""

import logging

from fastcps.logger import setup_logging


def test_rank_zero_prints_other_ranks_stay_quiet(capsys, monkeypatch):
    setup_logging()
    setup_logging()  # idempotent: no second handler, no doubled lines
    log = logging.getLogger("fastcps.trainer")
    monkeypatch.setenv("RANK", "0")
    log.info("epoch %d/%d", 1, 2)
    log.warning("2 prompts are cut")
    assert capsys.readouterr().out == "[fastcps] epoch 1/2\n[fastcps] warning: 2 prompts are cut\n"
    monkeypatch.setenv("RANK", "1")
    log.info("epoch 1/2")
    assert capsys.readouterr().out == ""
    log.info("rank 1 is here", extra={"all_ranks": True})
    assert capsys.readouterr().out == "[fastcps] rank 1 is here\n"
