defmodule Quichex.DocsTest do
  # The public surface is documented: every public module has a moduledoc,
  # and every function it documents (not `@doc false`, not a behaviour
  # callback implementation, which Elixir hides) has a `@spec` and a `@doc`
  # with an example. The list of public modules is derived from the compiled
  # application (every module of :quichex whose moduledoc is not hidden), so
  # a new public module is checked without editing this file; the modules the
  # style guide names are asserted to be among them.
  use ExUnit.Case, async: true

  # The runnable examples of the public modules (Quichex.Config's run in
  # config_test.exs).
  doctest Quichex
  doctest Quichex.Handler
  doctest Quichex.Stream
  doctest Quichex.CIDGenerator.Random
  doctest Quichex.TransportError
  doctest Quichex.ApplicationError

  @named_public [
    Quichex,
    Quichex.Config,
    Quichex.Connection,
    Quichex.Stream,
    Quichex.Listener,
    Quichex.Handler,
    Quichex.ConnectionHandler,
    Quichex.CIDGenerator,
    Quichex.CIDGenerator.Random,
    Quichex.CIDGenerator.QuicLB,
    Quichex.DevCert,
    Quichex.Telemetry,
    Quichex.TransportError,
    Quichex.ApplicationError
  ]

  # Test support modules are compiled into the same application in the test
  # environment; they are not the library's surface.
  defp lib_modules do
    {:ok, modules} = :application.get_key(:quichex, :modules)
    Enum.reject(modules, &String.starts_with?(inspect(&1), "Quichex.Test."))
  end

  defp docs!(module) do
    case Code.fetch_docs(module) do
      {:docs_v1, _anno, :elixir, _format, moduledoc, _meta, entries} -> {moduledoc, entries}
      other -> flunk("no docs chunk for #{inspect(module)}: #{inspect(other)}")
    end
  end

  defp public_modules do
    for module <- lib_modules(),
        {moduledoc, _} = docs!(module),
        moduledoc not in [:hidden, :none],
        do: module
  end

  # A markdown example: a fenced block, a doctest, or an indented code block
  # (a line indented by 4 or more spaces after a blank line that is not a
  # nested list item).
  defp example?(text) do
    String.contains?(text, ["```", "iex>"]) or Regex.match?(~r/(^|\n)\n {4,}[^\s*-]/, text)
  end

  defp documented_functions(module) do
    {_moduledoc, entries} = docs!(module)

    for {{kind, name, arity}, _anno, _sig, doc, _meta} <- entries,
        kind in [:function, :macro],
        doc != :hidden,
        do: {kind, name, arity, doc}
  end

  test "the modules the style guide names are public, and every other module is hidden" do
    public = public_modules()

    for module <- @named_public do
      assert module in public, "#{inspect(module)} has no public @moduledoc"
    end

    # Anything else public must be a deliberate addition to the list above;
    # Mix tasks are public by nature (`mix help` shows their moduledoc).
    unnamed =
      Enum.reject(public -- @named_public, &String.starts_with?(inspect(&1), "Mix.Tasks."))

    assert unnamed == []
  end

  test "every public module's moduledoc is written and shows an example" do
    missing =
      for module <- public_modules(),
          {moduledoc, _} = docs!(module),
          not match?(%{"en" => text} when is_binary(text), moduledoc) or
            not example?(moduledoc["en"]),
          do: inspect(module)

    assert missing == [], "no moduledoc example: #{Enum.join(missing, ", ")}"
  end

  test "every documented function of a public module has a @doc with an example" do
    missing =
      for module <- public_modules(),
          {kind, name, arity, doc} <- documented_functions(module),
          not match?(%{"en" => text} when is_binary(text), doc) or not example?(doc["en"]),
          do: "#{kind} #{inspect(module)}.#{name}/#{arity}"

    assert missing == [], "no @doc example: #{Enum.join(missing, ", ")}"
  end

  test "every documented function of a public module has a @spec" do
    missing =
      for module <- public_modules(),
          {:ok, specs} = Code.Typespec.fetch_specs(module),
          specced = MapSet.new(specs, fn {name_arity, _} -> name_arity end),
          # Macros are specced as MACRO-name/arity+1; __using__ is a macro
          # the compiler expands, so only functions are required here.
          {:function, name, arity, _doc} <- documented_functions(module),
          {name, arity} not in specced,
          do: "#{inspect(module)}.#{name}/#{arity}"

    assert missing == [], "no @spec: #{Enum.join(missing, ", ")}"
  end

  test "every public function of a public module is documented or deliberately hidden" do
    # A def without @doc shows in the docs chunk with doc :none; it must be
    # either documented or marked @doc false (the style guide's internal helpers).
    undocumented =
      for module <- public_modules(),
          {_moduledoc, entries} = docs!(module),
          {{kind, name, arity}, _anno, _sig, :none, _meta} <- entries,
          kind in [:function, :macro],
          do: "#{inspect(module)}.#{name}/#{arity}"

    assert undocumented == [], "neither @doc nor @doc false: #{Enum.join(undocumented, ", ")}"
  end

  test "the checks above see real content: Quichex.Config.new/1 is documented and specced" do
    assert {:function, :new, 1, %{"en" => doc}} =
             Enum.find(documented_functions(Quichex.Config), &match?({_, :new, 1, _}, &1))

    assert example?(doc)
    {:ok, specs} = Code.Typespec.fetch_specs(Quichex.Config)
    assert Enum.any?(specs, &match?({{:new, 1}, _}, &1))
    refute example?("prose only, no code")
    refute example?("A list:\n\n    * `:a` - an item\n")
    assert example?("Like this:\n\n    Quichex.Config.new()\n")
  end
end
