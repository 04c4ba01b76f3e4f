"""`python -m utils.bench`: the side-by-side benchmark. `compare` holds the flags, the statistics, the tie check,
the table and the chart; `methods` prepares and runs each compared method (transformers' and this suite's);
`floor` (`python -m utils.bench.floor`) times decoding steps against the weight-read floor, with and without
CUDA graphs.
May import utils plumbing and engine/; nothing else imports it."""
