"""The prompt hook a session's bash gets, without any rc file being touched.

It reaches bash through two environment variables: ``PROMPT_COMMAND='eval
"$TERMSYS_SHELL_HOOK"'`` runs ``BASH_HOOK`` at the first prompt, after the rc files; it then
puts its own two functions first and last in ``PROMPT_COMMAND`` (keeping what the rc files put
there) and installs a DEBUG trap. At every prompt and command it writes:

- ``ESC ] 633 ; D ; <exit code> ; duration=<ms> BEL`` when a command finished (nothing after
  an empty line; ``;duration=`` only where bash has ``EPOCHREALTIME``, 5.0 and later),
- ``ESC ] 7 ; file://<host><percent-encoded cwd> BEL``,
- ``ESC ] 633 ; A BEL`` before and ``ESC ] 633 ; B BEL`` after the prompt text (inside PS1),
- ``ESC ] 633 ; E ; <command line> BEL ESC ] 633 ; C BEL`` before a command line runs, the
  command line escaped as VS Code's 633;E is: ``\\`` for a backslash, ``\\x3b`` for ``;``,
  ``\\xNN`` for a control character.

Other shells ignore ``PROMPT_COMMAND``: they write no marks and nothing is recorded.
"""

from __future__ import annotations

HOOK_VARIABLE = "TERMSYS_SHELL_HOOK"
HOOK_PROMPT_COMMAND = f'eval "${HOOK_VARIABLE}"'

BASH_HOOK = r"""
if [ -n "${BASH_VERSION-}" ] && [ -z "${__termsys_installed-}" ]; then
__termsys_installed=1
__termsys_status=0 __termsys_at_prompt= __termsys_running= __termsys_histnum= __termsys_started=
export -n PROMPT_COMMAND TERMSYS_SHELL_HOOK
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
__termsys_precmd() {
  __termsys_status=$?
  __termsys_at_prompt=
  if [ -n "$__termsys_running" ]; then
    __termsys_running=
    local ms=
    if [ -n "$__termsys_started" ] && [ -n "${EPOCHREALTIME-}" ]; then
      ms=$(( (${EPOCHREALTIME//[!0-9]/} - __termsys_started) / 1000 ))
    fi
    printf '\e]633;D;%s%s\a' "$__termsys_status" "${ms:+;duration=$ms}"
  fi
  local p=$PWD
  if [[ $p == *[!A-Za-z0-9/._~-]* ]]; then __termsys_encode "$p"; p=$__termsys_out; fi
  printf '\e]7;file://%s%s\a' "${HOSTNAME-}" "$p"
  return $__termsys_status
}
__termsys_ready() {
  case $PS1 in *'633;A'*) ;; *) PS1='\[\e]633;A\a\]'"$PS1"'\[\e]633;B\a\]' ;; esac
  __termsys_at_prompt=1
  return $__termsys_status
}
__termsys_preexec() {
  [ -n "$__termsys_at_prompt" ] && [ -z "${COMP_LINE-}" ] || return 0
  [ "$BASH_COMMAND" = __termsys_precmd ] && return 0  # an empty command line
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
__termsys_install() {
  local rest=${PROMPT_COMMAND-} after
  after=${rest#*"$1"}
  [ "$after" = "$rest" ] && after=
  rest=${rest//"$1"/}
  while [[ $rest == [\;[:space:]]* ]]; do rest=${rest:1}; done
  while [[ $rest == *[\;[:space:]] ]]; do rest=${rest%?}; done
  if [[ ${PROMPT_COMMAND@a} == *a* ]]; then
    PROMPT_COMMAND=(__termsys_precmd "$rest" "${PROMPT_COMMAND[@]:1}" __termsys_ready)
  else
    PROMPT_COMMAND="__termsys_precmd${rest:+; $rest}; __termsys_ready"
  fi
  [ -z "$(trap -p DEBUG)" ] && trap '__termsys_preexec' DEBUG
  __termsys_precmd
  [[ $after == *[![:space:]\;]* ]] || __termsys_ready
}
__termsys_install 'eval "$TERMSYS_SHELL_HOOK"'
fi
"""


def hook_environment() -> dict[str, str]:
    """Return the environment variables that give a session's bash the prompt hook."""
    return {"PROMPT_COMMAND": HOOK_PROMPT_COMMAND, HOOK_VARIABLE: BASH_HOOK}
