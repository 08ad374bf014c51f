# Shared by the launch scripts (sourced): quoting for remote shells and the environment passed to every host.

# The words of a command as one string that a bash on the other end splits back into the same words.
quote_words() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(printf '%q' "$word")"; done
  printf '%s' "$out"
}

# NAME=VALUE words of the variables every host must see: jclip/JAX/XLA/libtpu settings set here.
passed_env() {
  local name
  for name in $(compgen -e | LC_ALL=C sort); do
    case "$name" in
      JCLIP_*|JAX_*|XLA_FLAGS|LIBTPU_INIT_ARGS|TPU_STDERR_LOG_LEVEL|TPU_MIN_LOG_LEVEL|NCCL_*) printf '%s\n' "$name=${!name}" ;;
    esac
  done
}

# Runs "$@", or with DRY_RUN=1 prints it (one line, quoted as a shell would need it).
run_or_print() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then quote_words "$@"; echo; else "$@"; fi
}
