// Prints, for each code point read from stdin (JSON list of ints), whether Go's strconv.IsPrint
// accepts it: the test Ollama's Modelfile parser applies to every character of a value.
package main

import (
	"encoding/json"
	"os"
	"strconv"
)

func main() {
	var runes []rune
	if err := json.NewDecoder(os.Stdin).Decode(&runes); err != nil {
		panic(err)
	}
	printable := make([]bool, len(runes))
	for i, r := range runes {
		printable[i] = strconv.IsPrint(r)
	}
	if err := json.NewEncoder(os.Stdout).Encode(printable); err != nil {
		panic(err)
	}
}
