#!/usr/bin/env bash
# Mutation testing of fastcps with mutmut 3 (in the `dev` extra), in a scratch copy of the checkout per
# target, so that the repo gets no mutants/ folder and each target keeps its own cache.
#
#   bench/mutation.sh math              # = samplers, grpo and ops, one after another
#   bench/mutation.sh grpo              # one target: fastcps/grpo.py against tests/test_grpo.py
#   bench/mutation.sh ops "fastcps.ops.philox*"   # only the mutants whose names match
#   bench/mutation.sh trainer           # fastcps/update.py, rollout.py against the trainer/wiring tests
#   bench/mutation.sh update            # (or rollout) one of the two
#   bench/mutation.sh kernels           # the Triton launchers (the @triton.jit bodies are never mutated)
#   MUTATION_TESTS='["tests/test_rollout.py"]' bench/mutation.sh rollout "fastcps.rollout.x_plan*"
#
# The shared settings are pyproject.toml's [tool.mutmut]; each target swaps in its files and its tests
# (mutmut then runs, per mutant, only those of the target's tests that reach the mutated function: a
# per-module list keeps, e.g., the whole kernel matrix from running for every mutant of step_coeffs, which
# every op test calls). MUTATION_DIR (default build/, gitignored) holds build/mutation-<target>, reused
# between runs: mutmut re-tests only functions whose code changed, or the mutant names given.
# Scores and the equivalent mutants: bench/results/mutation.md.
set -euo pipefail

repo=$(git rev-parse --show-toplevel)
target=${1:-math}
shift || true
if [ "$target" = math ]; then
  for t in samplers grpo ops; do "$0" "$t" "$@"; done
  exit 0
fi

op_tests='"tests/test_cps_step.py", "tests/test_cps_logprob_kl.py", "tests/test_philox.py", "tests/test_ops_library.py", "tests/test_dispatch.py", "tests/test_op_arguments.py"'
case $target in
  samplers) mutate='["fastcps/samplers.py"]'
            tests='["tests/test_samplers.py", "tests/test_sde_step_with_logprob.py", "tests/test_ops_library.py"]' ;;
  grpo)     mutate='["fastcps/grpo.py"]'; tests='["tests/test_grpo.py"]' ;;
  ops)      mutate='["fastcps/ops/*.py"]'; tests="[$op_tests, \"tests/test_sde_step_with_logprob.py\"]" ;;
  kernels)  mutate='["fastcps/kernels/*.py"]'; tests="[$op_tests]" ;;
  trainer|update|rollout)
            mutate='["fastcps/update.py", "fastcps/rollout.py"]'
            [ "$target" = update ] && mutate='["fastcps/update.py"]'
            [ "$target" = rollout ] && mutate='["fastcps/rollout.py"]'
            # test_trainer.py's three end-to-end runs (12-17 s each, the same ground as the in-process
            # wiring tests) are left out: with them every surviving mutant costs a minute
            # three fake-CUDA cases: on CPU tensors a dropped device= or to_device() changes nothing
            tests='["tests/test_update.py", "tests/test_rollout.py", "tests/test_wiring.py", "tests/test_rollout_training_agreement.py", "tests/test_toy.py",
                    "tests/test_virtual_cuda.py::test_rollout_and_micro_step_on_fake_cuda[toy-full]",
                    "tests/test_virtual_cuda.py::test_update_loop_reads_nothing_on_the_host[toy-lora]",
                    "tests/test_virtual_cuda.py::test_prompt_encodings_keep_their_cache_in_host_memory",
                    "tests/test_trainer.py::test_unknown_key_and_wrong_type_are_named",
                    "tests/test_trainer.py::test_batch_arithmetic_depends_on_world_size",
                    "tests/test_trainer.py::test_missing_weights_path_names_the_key",
                    "tests/test_trainer.py::test_a_reward_that_raises_stops_the_run_and_names_it",
                    "tests/test_trainer.py::test_non_finite_loss_skips_steps_then_stops"]' ;;
  *) echo "usage: $0 math|samplers|grpo|ops|trainer|update|rollout|kernels [mutant name globs]" >&2; exit 2 ;;
esac

# MUTATION_TESTS='["tests/a.py", ...]' replaces the target's tests: a fast first pass whose kills stand (a
# subset of the suite killed them) and whose survivors are re-run with the target's own list afterwards.
tests=${MUTATION_TESTS:-$tests}
work=${MUTATION_DIR:-$repo/build}/mutation-$target
mkdir -p "$work"
# The sources as the working tree has them (tracked and untracked-but-not-ignored files). kernels/ goes in
# as a real folder fastcps/kernels/ (in the repository a link to it), where the installed package has it,
# so that the copy imports its own kernels rather than the editable install's.
(cd "$repo" && git ls-files -z -co --exclude-standard fastcps tests configs pyproject.toml ':!fastcps/kernels' \
  | xargs -0 cp --parents -p -t "$work")
mkdir -p "$work/fastcps/kernels"
(cd "$repo/kernels" && git ls-files -z -co --exclude-standard . | xargs -0 cp --parents -p -t "$work/fastcps/kernels")

python - "$work/pyproject.toml" "$mutate" "$tests" <<'EOF'
import json, re, sys
path, mutate, tests = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
text = open(path).read()
for key, value in (("only_mutate", mutate), ("pytest_add_cli_args_test_selection", tests)):
    text, n = re.subn(rf"^{key} = \[.*?\]$", f"{key} = {json.dumps(value)}", text, flags=re.M | re.S)
    assert n == 1, f"pyproject.toml [tool.mutmut] needs one '{key} = [...]' line"
open(path, "w").write(text)
EOF

cd "$work"
start=$(date +%s)
status=0
# the progress spinner rewrites one line (\r): print each finished line and the spinner's last state only
mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@" 2>&1 | python -u -c '
import sys
last, line = "", ""
for ch in iter(lambda: sys.stdin.read(1), ""):
    if ch not in "\r\n":
        line += ch
        continue
    if line[:1] and 0x2800 <= ord(line[0]) <= 0x28FF:  # a braille spinner frame
        last = line
    elif line.strip():
        print(line)
    line = ""
print(last)' || status=$?
echo "target $target: $(( $(date +%s) - start )) s wall, $(nproc) cores, mutmut $(python -c 'import importlib.metadata as m; print(m.version("mutmut"))')"
mutmut results --all true > results.txt || true
python "$repo/bench/mutation_summary.py" results.txt
exit "$status"
