# Lines for .ci/run (Slurm backend, issue 9). Merge into the existing `need=()` block and the
# exports before `make lint`:

# 1. next to the existing checks that fill need=() (before the `if [ ${#need[@]} -gt 0 ]` block):
for bin in slurmctld slurmd sbatch munged; do
  command -v "$bin" >/dev/null || PATH="$PATH:/usr/sbin" command -v "$bin" >/dev/null || {
    need+=(slurmctld slurmd slurm-client munge); break; }
done

# 2. in that block, install without recommends (43 packages with them, 8 without), i.e. replace
#    apt-get install -y -qq "${need[@]}" >/dev/null
#    by
#    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
#    (the postinst scripts try to start the daemons; policy-rc.d or a missing init stops that,
#    and the tests never use the system services)

# 3. next to `export MQI_TEST_REQUIRE_OPENSSH=1`, only when root (the fixture needs root):
if [ "$(id -u)" = 0 ]; then export MQI_TEST_REQUIRE_SLURM=1; fi
