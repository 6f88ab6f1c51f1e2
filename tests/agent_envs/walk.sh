#!/usr/bin/env bash
# walk.sh: reach the goal, two steps left or right of the start (an lmforge environment).
# Rows 0, 2, 4... put the goal on the left, 1, 3, 5... on the right. lmforge writes "type" and
# "episode" first on each line; every line read gets one line back.
declare -A pos goal
where() { local side=left; (( goal[$1] > pos[$1] )) && side=right; echo "You are at ${pos[$1]}. The goal is to the $side."; }
while IFS= read -r line; do
    [[ $line =~ ^\{\"type\":\ \"([a-z]+)\",\ \"episode\":\ \"([^\"]*)\" ]] || exit 1
    type=${BASH_REMATCH[1]} e=${BASH_REMATCH[2]}
    if [[ $type == reset ]]; then
        [[ $line =~ \"lmforge_row\":\ ([0-9]+) ]]
        pos[$e]=0; goal[$e]=$(( BASH_REMATCH[1] % 2 ? 2 : -2 ))
        echo "{\"episode\": \"$e\", \"observation\": \"$(where "$e") Say left or right.\"}"
    elif [[ $type == step ]]; then
        [[ $line =~ \"content\":\ \"([^\"]*)\" ]]
        case ${BASH_REMATCH[1]} in *right*) (( pos[$e] += 1 )) ;; *left*) (( pos[$e] -= 1 )) ;; esac
        if (( pos[$e] == goal[$e] )); then echo "{\"episode\": \"$e\", \"reward\": 1, \"done\": true}"
        else echo "{\"episode\": \"$e\", \"observation\": \"$(where "$e")\"}"; fi
    else
        unset "pos[$e]" "goal[$e]"
        echo "{\"episode\": \"$e\"}"
    fi
done
