"""Pure planning from metadata: no I/O, no process group, no tensor data.

Names (`names`: canonical parameter names, names that become paths), the structure walk (`structure`: which modules play
which PEFT role), PEFT's key choice (`keys`), the element-range transfer and read plans (`ranges`), DTensor placements
(`placements`), the union of pipeline stages (`stages`), the plan cache (`cache`), the merge plan (`merge_steps`: which
base tensor each adapter tensor changes, and how), the meta-device model builders (`skeleton`) and the rescue's plan
predicted without them where exact (`predicted`). Every rank computes the same plan from what it knows, so these are the
functions tested at 1024 ranks without starting one. May import `shardsave.errors`, `log`, `compat` and torch / PEFT
metadata; nothing else of shardsave."""
