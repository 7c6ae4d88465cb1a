#!/usr/bin/env bash
# Your own objective on the embedded default, end to end at small scale (CI runs it via `make example`):
# a reward defined in a file -> rollout trees labelled by it -> a value model (its held-out quality
# printed) -> steered generation scored by the same reward -> one request to the HTTP server.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${MAVIS:-.venv/bin/mavis-align}
PY=$(dirname "$M")/python
OUT=${OUT:-runs/own-objective}
R=examples/my_reward.py:polite
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1. rollout trees labelled by $R"
$M collect --out "$OUT/trees.h5" --reward "$R" --limit 16 --layers 3 --k-root 4 --k 2 --max-new-tokens 32

echo "== 2. a value model for 'polite' (defaults: trunk:4, ridge heads on every leaf)"
$M train --trees "$OUT/trees.h5" --objective polite --out "$OUT/value" | tee "$OUT/train.json"

echo "== 3. steered generation, scored by the same reward"
$M generate --value polite="$OUT/value/best" --weights polite=1 --beta 20 --no-normalize --tail keep \
    --reward "$R" --split val --limit 4 --max-new-tokens 32 --output "$OUT/gen.jsonl"

echo "== 4. one request to the server"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$M serve --value polite="$OUT/value/best" --reward "$R" --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages": [{"role": "user", "content": "Can you help me write a note to my neighbour?"}], "max_tokens": 24,
       "objective_weights": {"polite": 1}, "beta": 20, "normalize": false, "tail": "keep", "seed": 0, "return_rewards": true}' \
  | tee "$OUT/response.json"
echo
"$PY" - "$OUT/response.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["choices"][0]["message"]["content"], "empty response"
assert "polite" in r["mavis"]["rewards"], f"the server did not score the user reward: {r['mavis']}"
print("server ok: reward", r["mavis"]["rewards"], "KL", round(r["mavis"]["kl"], 3))
PYEOF
