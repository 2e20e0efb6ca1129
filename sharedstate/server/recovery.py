"""Recovery at the start of a server process: the state its files hold — the snapshot, or its backup when
the snapshot is missing, with the journals it does not cover replayed over it."""

from __future__ import annotations

import logging
from pathlib import Path

from sharedstate._errors import SnapshotError
from sharedstate.persistence.files import backup_path
from sharedstate.persistence.journal import Journal, replay_records, scan_journals
from sharedstate.persistence.snapshot import read_snapshot
from sharedstate.server.service import StateService

log = logging.getLogger(__name__)


def recover(service: StateService, path: Path) -> None:
    """Bring ``service`` to the state its files on ``path`` hold: restore the snapshot (or, when it is
    missing, its backup), replay the journals it does not cover, and open the journal to write (with
    ``durability="journal"``) or fold a journal left behind into the snapshot."""
    config = service.config
    files, torn = scan_journals(path)  # before anything is restored: a damaged journal refuses the start
    snapshot = read_snapshot(path)
    generation = 0
    bak = backup_path(path)
    if snapshot is None and not path.exists() and bak.exists():
        # Never start empty beside a good backup: the next saves would replace it with nothing.
        snapshot = read_snapshot(bak)
        if snapshot is not None:
            _check_backup_journals(path, bak, snapshot.generation, files)
            log.warning("%s is missing: starting from its backup %s (%d names)", path, bak, len(snapshot.data))
            service.restored_from_backup = 1
    # The files are replayed as the server made them: the clock decides no expiry until they all are.
    service.deadlines.frozen = True
    if snapshot is not None:
        service.install(path, snapshot)
        service.answers.load(snapshot.answers or {})
        generation = snapshot.generation
        log.info("restored %d names from %s", len(snapshot.data), path)
    for empty in torn:
        log.warning("%s: removed a journal whose header a crash cut short (it held no changes)", empty)
        empty.unlink()
    replayed = 0
    for record in replay_records(path, generation, files):
        service.apply(record)
        replayed += 1
    service.deadlines.frozen = False
    newest = max([generation, *(g for g, _ in files)])
    if config.durability == "journal":
        journal = Journal(path, config.journal_fsync)
        journal.generation = newest
        journal.saved = generation
        service.journal = journal
        if replayed:
            service.save_to(path, why="save after replaying the journal")
        elif newest == generation and generation not in {g for g, _ in files}:
            # The journal of the snapshot's own generation (a clean stop removed it, empty): so the
            # backup the next save makes of this snapshot has every journal it needs, with no gap.
            journal.start_generation(generation)
        else:
            journal.start_generation(newest + 1)
        journal.start_flusher()
    else:
        if replayed:  # a journal left by a journaling server: fold it into the snapshot
            # A generation above every journal on disk: if the clean-up below does not happen, the
            # next start still replays none of them twice.
            service.save_to(path, why="save after replaying the journal", generation=newest + 1)
        Journal(path, "everysec").close(remove=True)
    while service.sweep() == 0.0:  # names past their deadline go now (journaled, with a journal), all of them
        pass


def _check_backup_journals(path: Path, bak: Path, generation: int, files: list[tuple[int, Path]]) -> None:
    """Refuse to start from the backup ``bak`` (of journal ``generation``) if the journals to replay
    over it do not follow it without a gap: later changes replayed over a state that lacks earlier ones
    would make a state that never existed."""
    needed = [g for g, _ in files if g >= generation]
    if needed and needed != list(range(generation, generation + len(needed))):
        present = ", ".join(str(p) for g, p in files if g >= generation)
        missing = sorted(set(range(generation, needed[-1] + 1)) - set(needed)) or [generation]
        raise SnapshotError(
            f"{path} is missing and its backup {bak} (journal generation {generation}) cannot be "
            f"brought up to date: the journal of generation {missing[0]} is missing, so replaying {present} over "
            f"the backup would skip changes; restore a snapshot by hand, or move those journals away to start "
            f"from the backup alone",
            str(bak),
        )
