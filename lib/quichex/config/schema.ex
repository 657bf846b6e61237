defmodule Quichex.Config.Schema do
  @moduledoc false
  # Validation of option values against schema types, shared by
  # Quichex.Config and the option lists of Connection, Listener and Stream.

  # The largest value a QUIC variable-length integer holds (2^62 - 1): error
  # codes, stream limits and windows.
  @max_varint 4_611_686_018_427_387_903
  # The largest timeout accepted, in milliseconds (about 49.7 days, less the
  # grace a call adds to a deadline its server enforces): Erlang timers and
  # `receive ... after` take at most 2^32 - 1.
  @max_timeout 4_294_000_000

  @doc false
  def max_varint, do: @max_varint

  @doc false
  def max_timeout, do: @max_timeout

  @doc false
  # What every `:timeout` option takes: the one place its limit is told.
  def timeout_doc do
    "an integer of milliseconds from 0 to #{@max_timeout} (about 49.7 days: Erlang " <>
      "timers take at most 2^32 - 1 ms) or `:infinity`"
  end

  @doc false
  def validate!(key, type, value) do
    unless valid?(type, value) do
      raise ArgumentError,
            "invalid value for option #{inspect(key)}: expected #{type_doc(type)}, got: #{inspect(value, limit: 10, printable_limit: 80)}"
    end

    :ok
  end

  @doc false
  # Keyword.validate!/2, raising ArgumentError (not FunctionClauseError) for
  # something that is not a keyword list at all.
  def validate_keyword!(opts, spec), do: opts |> keyword!() |> Keyword.validate!(spec)

  @doc false
  # `opts` if it is a keyword list; raises ArgumentError otherwise.
  def keyword!(opts) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError,
            "expected a keyword list of options, got: #{inspect(opts, limit: 10, printable_limit: 80)}"
    end

    opts
  end

  @doc false
  # Validates a keyword list against `[{key, [type: t, default: d]}]`:
  # unknown keys and bad values raise ArgumentError; returns a map with
  # defaults filled in.
  def validate_opts!(opts, schema) do
    opts = validate_keyword!(opts, Enum.map(schema, fn {k, spec} -> {k, spec[:default]} end))

    for {key, spec} <- schema, into: %{} do
      value = Keyword.fetch!(opts, key)

      cond do
        value == nil and spec[:required] ->
          raise ArgumentError, "missing required option #{inspect(key)}"

        value == nil and spec[:default] == nil ->
          {key, nil}

        true ->
          validate!(key, spec[:type], value)
          {key, value}
      end
    end
  end

  @doc false
  def valid?({:integer, min, max}, v), do: is_integer(v) and v >= min and v <= max
  def valid?(:boolean, v), do: is_boolean(v)
  def valid?({:in, values}, v), do: v in values

  def valid?(:path, v),
    do: is_binary(v) and v != "" and String.valid?(v) and not String.contains?(v, <<0>>)

  def valid?(:ticket_key, v), do: is_binary(v) and byte_size(v) == 48
  def valid?(:timeout, v), do: v == :infinity or (is_integer(v) and v >= 0 and v <= @max_timeout)
  def valid?(:varint, v), do: is_integer(v) and v >= 0 and v <= @max_varint
  def valid?(:pos_integer, v), do: is_integer(v) and v > 0
  def valid?(:non_neg_integer, v), do: is_integer(v) and v >= 0
  def valid?(:pid, v), do: is_pid(v)
  def valid?(:atom, v), do: is_atom(v)
  def valid?(:keyword, v), do: Keyword.keyword?(v)
  def valid?(:string, v), do: is_binary(v)
  def valid?(:binary, v), do: is_binary(v)
  def valid?(:any, _v), do: true
  def valid?({:struct, mod}, v), do: is_struct(v, mod)
  def valid?({:or, types}, v), do: Enum.any?(types, &valid?(&1, v))

  def valid?(:alpn_list, v) do
    is_list(v) and v != [] and
      Enum.all?(v, &(is_binary(&1) and byte_size(&1) in 1..255))
  end

  @doc false
  def type_doc({:integer, min, max}), do: "an integer in #{min}..#{max}"
  def type_doc(:boolean), do: "a boolean"
  def type_doc({:in, values}), do: "one of #{Enum.map_join(values, ", ", &inspect/1)}"
  def type_doc(:path), do: "a non-empty UTF-8 path string"
  def type_doc(:ticket_key), do: "a 48-byte binary"
  def type_doc(:alpn_list), do: "a non-empty list of 1..255 byte binaries"

  def type_doc(:timeout),
    do: "a non-negative integer of milliseconds up to #{@max_timeout}, or :infinity"

  def type_doc(:varint), do: "an integer in 0..#{@max_varint}"
  def type_doc(:pos_integer), do: "a positive integer"
  def type_doc(:non_neg_integer), do: "a non-negative integer"
  def type_doc(:pid), do: "a pid"
  def type_doc(:atom), do: "an atom"
  def type_doc(:keyword), do: "a keyword list"
  def type_doc(:string), do: "a string"
  def type_doc(:binary), do: "a binary"
  def type_doc(:any), do: "any term"
  def type_doc({:struct, mod}), do: "a %#{inspect(mod)}{}"
  def type_doc({:or, types}), do: Enum.map_join(types, " or ", &type_doc/1)

  @doc false
  # A valid value of an option, for the examples in generated docs: the
  # entry's `:example`, else one derived from its type.
  def example(spec) do
    case Keyword.fetch(spec, :example) do
      {:ok, example} -> example
      :error -> example_of(spec[:type])
    end
  end

  defp example_of({:integer, min, max}), do: 10 |> max(min) |> min(max)
  defp example_of(:varint), do: 5_000
  defp example_of(:boolean), do: true
  defp example_of({:in, values}), do: List.last(values)

  @doc false
  # Renders an option schema as a Markdown bullet list for moduledocs.
  def docs(schema) do
    Enum.map_join(schema, "\n", fn {name, spec} ->
      default =
        case spec[:default] do
          nil -> ""
          value -> " Default: `#{inspect(value)}`."
        end

      required = if spec[:required], do: " Required.", else: ""
      "  * `#{inspect(name)}` (#{type_doc(spec[:type])}): #{spec[:doc]}#{required}#{default}"
    end)
  end
end
