"""Everything around the engine: data, model loading, reporting, and the tools and training built on them.

Plumbing every script shares sits at this level: `errors` (UserError), `config` (every default once), `cli`
(shared flags, validation, device/dtype), `data` (prompts), `models` (loading targets and drafts),
`experiment` (load a pair, run prompts, summarise), `report` (result files), `timing` (timing forwards
as the decoder runs them). Subsystems have a folder each:
`training/` (draft pretraining), `growmap_tool/`, `bench/`, `potential/`,
`commonsense/` (follower tables for test_greedyS_commonsense.py). Imports point one way:
scripts -> tools and training -> plumbing -> engine/.
"""
