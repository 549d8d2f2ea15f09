"""The prompt hook a session's bash gets, without any rc file being touched.

It reaches bash through two environment variables: ``PROMPT_COMMAND`` (``HOOK_PROMPT_COMMAND``)
evaluates ``BASH_HOOK``, kept in ``TERMSYS_SHELL_HOOK``, at the first prompt, after the rc
files. The hook moves whatever the rc files added to ``PROMPT_COMMAND`` into a variable of its
own, run between its two functions (the first one keeps ``$?`` for the rest), and leaves
``PROMPT_COMMAND`` exported and as it found it: a bash started from the session's (``bash``,
``bash -l``, ``exec bash``, by a program) inherits both variables and gets the hook the same
way, whatever its rc files do, unless they replace ``PROMPT_COMMAND``. Non-interactive bash
never shows a prompt, so scripts run nothing of it; other shells ignore both variables. At
every prompt and command it writes (``<aid>``: the shell's pid, which tells nested shells
apart):

- ``ESC ] 633 ; D ; <exit code> ; aid=<aid> ; duration=<ms> BEL`` when a command finished
  (nothing after an empty line; ``;duration=`` only where bash has ``EPOCHREALTIME``, 5.0 and
  later),
- ``ESC ] 7 ; file://<host><percent-encoded cwd> BEL``,
- ``ESC ] 633 ; A ; aid=<aid> BEL`` before and ``ESC ] 633 ; B BEL`` after the prompt text
  (inside PS1),
- ``ESC ] 633 ; E ; <command line> BEL ESC ] 633 ; C BEL`` before a command line runs, the
  command line escaped as VS Code's 633;E is: ``\\`` for a backslash, ``\\x3b`` for ``;``,
  ``\\xNN`` for a control character.
"""

from __future__ import annotations

HOOK_VARIABLE = "TERMSYS_SHELL_HOOK"
# Once the hook is installed, ``__termsys_prompt`` holds what this shell runs at a prompt; a
# bash started from it has no such variable (it is an array: never exported, even under
# ``set -a``), so the same PROMPT_COMMAND installs the hook there.
HOOK_PROMPT_COMMAND = f'eval "${{__termsys_prompt-${{{HOOK_VARIABLE}-}}}}"'

BASH_HOOK = r"""
if [ -n "${BASH_VERSION-}" ] && [ -z "${__termsys_prompt+set}" ]; then
__termsys_boot='@BOOT@'
__termsys_status=0 __termsys_at_prompt= __termsys_running= __termsys_histnum= __termsys_started=
__termsys_rest= __termsys_defer=
__termsys_encode() {
  local s=$1 out= c i LC_ALL=C
  for (( i = 0; i < ${#s}; i++ )); do
    c=${s:i:1}
    case $c in [A-Za-z0-9/._~-]) out+=$c ;; *) printf -v c '%%%02X' "'$c"; out+=$c ;; esac
  done
  __termsys_out=$out
}
__termsys_escape() {
  local s=${1//\\/\\\\} out= c i LC_ALL=C
  s=${s//;/\\x3b}
  if [[ $s == *[[:cntrl:]]* ]]; then
    for (( i = 0; i < ${#s}; i++ )); do
      c=${s:i:1}
      [[ $c == [[:cntrl:]] ]] && printf -v c '\\x%02x' "'$c"
      out+=$c
    done
    s=$out
  fi
  __termsys_out=$s
}
__termsys_adopt() {
  # Keep what else PROMPT_COMMAND runs (before the hook's place in it, then what was kept
  # earlier, then after), and leave it the hook alone again, exported for nested shells.
  local IFS=$'\n' pc before after part parts=()
  pc="${PROMPT_COMMAND[*]-}"
  before=${pc%%"$__termsys_boot"*}
  after=${pc#"$before"}
  after=${after#"$__termsys_boot"}
  after=${after//"$__termsys_boot"/:}
  while [[ $before == *[\;[:space:]] ]]; do before=${before%?}; done
  while [[ $after == [\;[:space:]]* ]]; do after=${after:1}; done
  # What comes after the hook still runs at this prompt: marking the prompt now would take
  # it for the first command line.
  [ -n "$after" ] && __termsys_defer=1
  for part in "$before" "$__termsys_rest" "$after"; do [ -n "$part" ] && parts+=("$part"); done
  __termsys_rest="${parts[*]}"
  unset PROMPT_COMMAND
  PROMPT_COMMAND=$__termsys_boot
  export PROMPT_COMMAND TERMSYS_SHELL_HOOK
  __termsys_prompt=("__termsys_precmd${__termsys_rest:+$IFS$__termsys_rest}${IFS}__termsys_ready")
}
__termsys_precmd() {
  __termsys_status=$?
  __termsys_at_prompt=
  [ "${PROMPT_COMMAND[*]-}" = "$__termsys_boot" ] || __termsys_adopt
  if [ -n "$__termsys_running" ]; then
    __termsys_running=
    local ms=
    if [ -n "$__termsys_started" ] && [ -n "${EPOCHREALTIME-}" ]; then
      ms=$(( (${EPOCHREALTIME//[!0-9]/} - __termsys_started) / 1000 ))
    fi
    printf '\e]633;D;%s;aid=%s%s\a' "$__termsys_status" "$$" "${ms:+;duration=$ms}"
  fi
  local p=$PWD
  if [[ $p == *[!A-Za-z0-9/._~-]* ]]; then __termsys_encode "$p"; p=$__termsys_out; fi
  printf '\e]7;file://%s%s\a' "${HOSTNAME-}" "$p"
  return $__termsys_status
}
__termsys_ready() {
  if [ -n "$__termsys_defer" ]; then
    __termsys_defer=
    return $__termsys_status
  fi
  case $PS1 in
    *"633;A;aid=$$\a"*) ;;
    *)  # not marked, or marked by the shell this one inherited an exported PS1 from
      PS1=${PS1#'\[\e]633;A;aid='*'\a\]'}
      PS1='\[\e]633;A;aid='$$'\a\]'${PS1%'\[\e]633;B\a\]'}'\[\e]633;B\a\]' ;;
  esac
  __termsys_at_prompt=1
  return $__termsys_status
}
__termsys_preexec() {
  [ -n "$__termsys_at_prompt" ] && [ -z "${COMP_LINE-}" ] || return 0
  # an empty command line: the prompt's own commands
  [ "$BASH_COMMAND" = "$__termsys_boot" ] || [ "$BASH_COMMAND" = __termsys_precmd ] && return 0
  __termsys_at_prompt=
  local line num
  line=$(HISTTIMEFORMAT= builtin history 1)
  line=${line#"${line%%[![:space:]]*}"}
  num=${line%%[!0-9]*}
  if [ -z "$num" ] || [ "$num" = "$__termsys_histnum" ]; then
    line=$BASH_COMMAND
  else
    line=${line:${#num}+2}
  fi
  __termsys_histnum=$num
  __termsys_escape "$line"
  printf '\e]633;E;%s\a\e]633;C\a' "$__termsys_out"
  __termsys_running=1
  __termsys_started=${EPOCHREALTIME//[!0-9]/}
}
[ -z "$(trap -p DEBUG)" ] && trap '__termsys_preexec' DEBUG
__termsys_adopt
__termsys_precmd
__termsys_ready
fi
""".replace("@BOOT@", HOOK_PROMPT_COMMAND)


def hook_environment() -> dict[str, str]:
    """Return the environment variables that give a session's bash the prompt hook."""
    return {"PROMPT_COMMAND": HOOK_PROMPT_COMMAND, HOOK_VARIABLE: BASH_HOOK}
