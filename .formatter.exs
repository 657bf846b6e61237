[
  inputs: [
    "{mix,.formatter}.exs",
    "{config,lib,test,integration,soak,examples,bench}/**/*.{ex,exs}"
  ],
  locals_without_parens: []
]
