# bash completion for kplctl (docs/kplctl.md, "Shell completion").
#
#   source clients/kplctl.bash        # or copy it to
#                                     # /usr/share/bash-completion/completions/kplctl
#
# Completes commands, each command's options and their fixed values, file
# names for submit, lint, --ca, --cert and --key, and - when kpld answers
# within 2 s - run ids (kplctl list), stage names (kplctl get), secret names
# and token ids, asking the server given on the command line (--server,
# --token, --ca, --cert, --key) or the usual environment and config file.
# It never prints what it asks.

# The options of each command, as in kplctl's command table (clients/kplctl.c).
_kplctl_opts() {
	case $1 in
	submit) echo "-o --output -p --param --idempotency-key --watch --plain" ;;
	get) echo "-o --output" ;;
	list) echo "-o --output --state --pipeline --limit" ;;
	watch) echo "-o --output --from-seq --plain" ;;
	logs) echo "-o --output --stage -f --follow" ;;
	cancel) echo "-o --output" ;;
	retry) echo "-o --output --watch --plain" ;;
	approve) echo "-o --output --reject -m --comment --by" ;;
	lint) echo "-o --output" ;;
	events) echo "-o --output --from --pipeline --kind" ;;
	token) echo "-o --output --scope --pipeline --description" ;;
	audit) echo "-o --output --from --limit" ;;
	secret) echo "-o --output --pipeline" ;;
	releases) echo "-o --output --limit" ;;
	rollback) echo "-o --output --to --watch --plain" ;;
	pipeline) echo "-o --output --repo --branch --path --secret --pull-requests --fork-secrets --status-token --schedule --ref --sha -p --param --idempotency-key --watch --plain" ;;
	diff) echo "-o --output" ;;
	esac
}

_kplctl_commands="submit get list watch logs cancel retry approve lint events token audit secret releases rollback pipeline diff"

# Runs kplctl with the connection options of the line being completed;
# nothing on stderr, at most 2 s.
_kplctl_ask() {
	local i conn=()
	for ((i = 1; i < ${#COMP_WORDS[@]} - 1; i++)); do
		case ${COMP_WORDS[i]} in
		--server | --token | --ca | --cert | --key) conn+=("${COMP_WORDS[i]}" "${COMP_WORDS[i + 1]}") ;;
		--server=* | --token=* | --ca=* | --cert=* | --key=*) conn+=("${COMP_WORDS[i]}") ;;
		esac
	done
	timeout 2 "${COMP_WORDS[0]}" "${conn[@]}" "$@" 2>/dev/null
}

# The values of one JSON key in kplctl's -o json output ("key": "value").
_kplctl_json_values() {
	grep -o "\"$1\": \"[^\"]*\"" | sed 's/^"[^"]*": "//; s/"$//'
}

_kplctl() {
	local cur prev cmd i nargs=0 args=()
	cur=${COMP_WORDS[COMP_CWORD]}
	prev=${COMP_WORDS[COMP_CWORD - 1]}

	# The command and the positional arguments before the cursor.
	for ((i = 1; i < COMP_CWORD; i++)); do
		case ${COMP_WORDS[i]} in
		--server | --token | --ca | --cert | --key | -o | --output | -p | --param | --idempotency-key | \
			--state | --pipeline | --limit | --from-seq | -m | --comment | --by | --from | \
			--kind | --scope | --description | --stage | --to | --repo | --branch | --path | \
			--secret | --status-token | --schedule | --ref | --sha)
			((i++)) ;;
		-*) ;;
		*)
			if [[ -z $cmd ]]; then
				cmd=${COMP_WORDS[i]}
			else
				args+=("${COMP_WORDS[i]}")
				((nargs++))
			fi
			;;
		esac
	done

	# Values of options.
	case $prev in
	-o | --output)
		COMPREPLY=($(compgen -W "text json" -- "$cur"))
		return ;;
	--state)
		COMPREPLY=($(compgen -W "queued running succeeded failed cancelled" -- "$cur"))
		return ;;
	--kind)
		COMPREPLY=($(compgen -W "run stage log audit" -- "$cur"))
		return ;;
	--scope)
		COMPREPLY=($(compgen -W "read submit approve admin" -- "$cur"))
		return ;;
	--ca | --cert | --key)
		compopt -o filenames 2>/dev/null
		COMPREPLY=($(compgen -f -- "$cur"))
		return ;;
	--stage)
		if [[ $cmd == logs && $nargs -ge 1 ]]; then
			COMPREPLY=($(compgen -W "$(_kplctl_ask get "${args[0]}" -o json |
				_kplctl_json_values name)" -- "$cur"))
		fi
		return ;;
	--server | --token | -p | --param | --idempotency-key | --pipeline | --limit | \
		--from-seq | -m | --comment | --by | --from | --description | --to | --repo | \
		--branch | --path | --secret | --status-token | --schedule | --ref | --sha)
		return ;;
	esac

	if [[ -z $cmd ]]; then
		if [[ $cur == -* ]]; then
			COMPREPLY=($(compgen -W "--server --ca --cert --key --token --help" -- "$cur"))
		else
			COMPREPLY=($(compgen -W "$_kplctl_commands" -- "$cur"))
		fi
		return
	fi
	if [[ $cur == -* ]]; then
		COMPREPLY=($(compgen -W "$(_kplctl_opts "$cmd") --server --ca --cert --key --token --help" -- "$cur"))
		return
	fi

	case $cmd in
	submit | lint)
		if [[ $cmd == lint || $nargs -eq 0 ]]; then
			compopt -o filenames 2>/dev/null
			COMPREPLY=($(compgen -f -- "$cur"))
		fi ;;
	get | watch | logs | cancel | retry | diff)
		[[ $nargs -eq 0 || ($cmd == diff && $nargs -eq 1) ]] && COMPREPLY=($(compgen -W "$(_kplctl_ask list -o json |
			_kplctl_json_values id)" -- "$cur")) ;;
	approve)
		if [[ $nargs -eq 0 ]]; then
			COMPREPLY=($(compgen -W "$(_kplctl_ask list --state running -o json |
				_kplctl_json_values id)" -- "$cur"))
		elif [[ $nargs -eq 1 ]]; then
			COMPREPLY=($(compgen -W "$(_kplctl_ask get "${args[0]}" -o json |
				_kplctl_json_values name)" -- "$cur"))
		fi ;;
	secret)
		if [[ $nargs -eq 0 ]]; then
			COMPREPLY=($(compgen -W "set list rm" -- "$cur"))
		elif [[ $nargs -eq 1 && ${args[0]} == rm ]]; then
			COMPREPLY=($(compgen -W "$(_kplctl_ask secret list | cut -d' ' -f1)" -- "$cur"))
		fi ;;
	pipeline)
		if [[ $nargs -eq 0 ]]; then
			COMPREPLY=($(compgen -W "register list show delete run" -- "$cur"))
		elif [[ $nargs -eq 1 && ${args[0]} != list ]]; then
			COMPREPLY=($(compgen -W "$(_kplctl_ask pipeline list -o json |
				_kplctl_json_values name)" -- "$cur"))
		fi ;;
	token)
		if [[ $nargs -eq 0 ]]; then
			COMPREPLY=($(compgen -W "create list revoke" -- "$cur"))
		elif [[ $nargs -eq 1 && ${args[0]} == revoke ]]; then
			COMPREPLY=($(compgen -W "$(_kplctl_ask token list -o json |
				_kplctl_json_values id)" -- "$cur"))
		fi ;;
	esac
}

complete -F _kplctl kplctl
