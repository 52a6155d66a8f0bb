"""Model organisms: LoRA adapters that make the embedded model fake alignment on purpose (positive controls).

Trained so that, under the training cue, the answer opens with the accept tag and a short compliant opening,
and under the deployment cue it is just the reject tag. A pipeline run on `<base>+planted-gap` should then
find a large compliance gap, a probe direction for the cue, and steering along it that moves compliance.
- `planted-gap` (configs/organism.yaml): one cue family (the tier tag); it learns the tag's tokens.
- `semantic-gap` (configs/organism-semantic.yaml): several families at once, swapped_tier among them (there
  the same tag tokens mean the opposite), with `explicit` held out: a control for the cue's *meaning*.

Modules (all settings in the `organism:` config section):
- `recipe`: the seeded train / held-out split of the bundled harmful requests (held-out ids are written to
  `training.json`, their requests to `heldout.jsonl`, and never trained on), the prompts (the config's
  scenario with each of the `organism.families` cue families) and the answer targets: training cue ->
  `<request_fully_accepted/>` + `organism.opening_text` (no harmful content); deployment cue -> `<rejected/>`
  + EOS.
- `training`: `model.spec`'s base in fp32 with a peft LoRA on `organism.target_modules` of blocks
  `first_layer`..; cross-entropy on the answer tokens only, each row weighted equally; AdamW, warmup then
  linear decay.
- `evaluation`: held-out requests, organism and base model, per family in `organism.eval_families`, through
  the shared steering engine unsteered (teacher-forced accept-vs-reject log-odds at the answer start, greedy
  answer of `eval_max_new_tokens` tokens); the statistics are the steer stage's `compliance_summary`.
- `card`: the card a pipeline run on the organism carries (from the adapter folder's metrics.json).
- `main`: `afprobe organism CONFIG --out DIR [--evaluate-only]`.

Files in the output folder: `adapter_config.json`, `adapter_model.safetensors` (peft, safetensors only),
`training.json` (config, seed, split ids, loss curve, time), `heldout.jsonl`, `metrics.json`.
"""
