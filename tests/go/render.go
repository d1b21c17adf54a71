// Renders an Ollama-style TEMPLATE with Go's text/template, the engine Ollama uses.
// Input (stdin, JSON): {"template": "...", "messages": [{"role": "...", "content": "..."}]}.
// As in Ollama, .System is every system message joined by a blank line and .Messages keeps
// all messages; missing keys render as zero values.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role     string `json:"role"`
	Content  string `json:"content"`
	Thinking string `json:"thinking"`
}

type Input struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

type Values struct {
	System     string
	Messages   []Message
	Prompt     string
	Response   string
	Think      bool
	IsThinkSet bool
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	var system []string
	for _, m := range in.Messages {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
	}
	tmpl := template.Must(template.New("t").Option("missingkey=zero").Parse(in.Template))
	values := Values{System: strings.Join(system, "\n\n"), Messages: in.Messages}
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
