defmodule Quichex.NativeTest do
  use ExUnit.Case, async: true

  import Bitwise
  import Quichex.Test.Helpers

  alias Quichex.Native

  # Every NIF and its arity.
  @nifs Quichex.Native.__info__(:functions) -- [load_nif: 0]

  test "every NIF stub has a native implementation loaded" do
    assert Quichex.quiche_version() == "0.30.0"
    assert length(@nifs) >= 15
  end

  defp resources do
    {:ok, config} = Quichex.Config.build(client_config(), :client)

    {:ok, conn} =
      Native.connection_connect(
        config,
        "localhost",
        :crypto.strong_rand_bytes(16),
        {{127, 0, 0, 1}, 40_000},
        {{127, 0, 0, 1}, 9},
        262_144,
        nil
      )

    {config, conn}
  end

  defp term_gen(config, conn) do
    leaf =
      :proper_types.oneof([
        :proper_types.atom(),
        :proper_types.binary(),
        :proper_types.integer(),
        :proper_types.elements([
          -1,
          0,
          1,
          255,
          65_536,
          4_611_686_018_427_387_904,
          18_446_744_073_709_551_616,
          -18_446_744_073_709_551_616,
          nil,
          true,
          :read,
          :write,
          [],
          {},
          1.5,
          self(),
          make_ref(),
          config,
          conn,
          {{127, 0, 0, 1}, 4433},
          {{127, 0, 0, 1, 0}, 4433},
          {{300, 0, 0, 1}, 1},
          {{0, 0, 0, 0, 0, 0, 0, 1}, 70_000},
          [{:max_idle_timeout, -1}],
          [{:cc_algorithm, :bogus}],
          [{{127, 0, 0, 1}, 4433}, "x", 0],
          [{{{127, 0, 0, 1}, 1}, <<0, 1, 2>>, 1}],
          [{0, "data", true}],
          [{4, 100}]
        ])
      ])

    :proper_types.oneof([
      leaf,
      :proper_types.list(leaf),
      :proper_types.tuple([leaf, leaf]),
      :proper_types.tuple([leaf, leaf, leaf])
    ])
  end

  test "property: every NIF survives random arguments with {:error, _}, ArgumentError or a result" do
    {config, conn} = resources()
    gen = term_gen(config, conn)

    property =
      forall(
        :proper_types.tuple([:proper_types.elements(@nifs), :proper_types.vector(7, gen)]),
        fn {{name, arity}, args} ->
          try do
            result = apply(Native, name, Enum.take(args, arity))
            allowed_result?(name, result)
          rescue
            ArgumentError -> true
          end
        end
      )

    proper!(property, 3_000)
    # The VM and the resources are still fine.
    assert {:ok, %{is_server: false}} = Native.connection_info(conn)
    assert is_list(Native.config_describe(config))
  end

  # A NIF either fails with {:error, reason} or answers in its own shape.
  defp allowed_result?(_name, {:error, _reason}), do: true
  defp allowed_result?(_name, {:ok, _value}), do: true
  defp allowed_result?(_name, :ok), do: true
  defp allowed_result?(:packet_version_supported, result), do: is_boolean(result)
  defp allowed_result?(:config_describe, result), do: is_list(result)
  defp allowed_result?(:quiche_version, result), do: result == "0.30.0"
  defp allowed_result?(:connection_live_count, result), do: is_integer(result) and result >= 0
  defp allowed_result?(_name, _result), do: false

  test "bad arguments give {:error, reason} or ArgumentError, never a crash" do
    {config, conn} = resources()
    local = {{127, 0, 0, 1}, 1234}

    assert {:error, {:badarg, "connection id"}} =
             Native.connection_connect(config, nil, "", local, local, 1, nil)

    assert {:error, {:badarg, "connection id"}} =
             Native.connection_connect(config, nil, :binary.copy("a", 21), local, local, 1, nil)

    assert {:error, {:badarg, "ip"}} =
             Native.connection_connect(config, nil, "abcd", {{1, 2, 3}, 1}, local, 1, nil)

    assert {:error, {:badarg, "server_name"}} =
             Native.connection_connect(config, "", "abcd", local, local, 1, nil)

    assert_raise ArgumentError, fn ->
      Native.connection_connect(conn, nil, "abcd", local, local, 1, nil)
    end

    assert_raise ArgumentError, fn -> Native.connection_poll(config, [], nil, false, [], []) end

    assert {:error, {:badarg, "error_code"}} =
             Native.connection_close(conn, true, 4_611_686_018_427_387_904, "")

    assert {:error, {:badarg, "direction"}} =
             Native.connection_poll(conn, [], nil, false, [], [{0, :sideways, 0}])

    assert {:error, {:badarg, "stream id"}} =
             Native.connection_stream_open(conn, 4_611_686_018_427_387_904, 3, true)

    assert {:error, {:badarg, "urgency"}} = Native.connection_stream_open(conn, 0, 8, true)

    assert {:error, {:badarg, "stream id"}} =
             Native.connection_flush(conn, [{4_611_686_018_427_387_904, "", true}], [], 1)

    assert {:error, {:invalid_option, :max_ack_delay}} =
             Native.config_build([{:max_ack_delay, 1 <<< 20}])

    assert {:error, {:invalid_option, :bogus}} = Native.config_build([{:bogus, 1}])
    assert {:error, {:badarg, "options"}} = Native.config_build(:nope)
    assert {:error, :buffer_too_short} = Native.packet_header(<<>>, 16)
    assert {:error, {:badarg, "dcid_len"}} = Native.packet_header("x", 21)
    # Garbage datagrams are dropped, not fatal.
    assert {:ok, %{reads: []}} =
             Native.connection_poll(
               conn,
               [{local, :crypto.strong_rand_bytes(1200), 0}],
               nil,
               false,
               [],
               []
             )

    assert {:ok, %{is_closed: false}} = Native.connection_info(conn)
  end
end
