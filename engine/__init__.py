"""Tree-based speculative decoding engine: a library (no printing, no argparse, no global state).

Vocabulary used throughout:
- *root*: node 0 of a step's tree, the last committed token, whose KV is not yet in the caches;
- *accepted* tokens: tree nodes the target agrees with, along one root-to-node path;
- *bonus* token: the one token the target adds after the accepted path (always emitted);
- *kv_slots*: explicit cache positions a forward writes its keys/values to.
"""
